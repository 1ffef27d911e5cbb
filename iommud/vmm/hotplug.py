"""Hot-adding delegated devices to a running VM (``iommuctl vm-attach``).

For each IOMMU group of the request, in order: a delegated claim that joins the VM's
iommufd (``VmState.claim``); when the VM has no iommufd yet (it started without devices,
or gave them all back), QMP ``getfd`` of the fresh /dev/iommu fd and ``object-add
iommufd``; then per device ``getfd`` of its cdev and ``device_add vfio-pci`` (QEMU binds
and maps; monitor_fd_param hands the named fd to the device, monitor/fds.c). A failure
undoes what QEMU still holds of that claim (``closefd`` of unused names, ``object-del``
of an object made for it) and gives the claim back, and the later claims of the request
too; devices already added stay with their leases (QEMU has them). One hotplug at a
time. The launcher's own fd copies are closed at the end whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any, Final

from iommud.client.calls import DelegatedClaim
from iommud.errors import IommudError
from iommud.vmm.control import AttachRequest, ControlError
from iommud.vmm.qmp import QmpClosedError, QmpError
from iommud.vmm.state import VmDevice, VmLease, VmState
from iommud.vmm.template import qdev_id_for

HOTPLUG_IOMMUFD: Final = "iommuctl-iommufd"  # + a number: object-add'ed when the VM has none


class Hotplug:
    """Serves ``attach`` requests for one VM (see the module docstring)."""

    def __init__(self, vm: VmState) -> None:
        self.vm = vm
        self._lock = asyncio.Lock()
        self._names = itertools.count()
        self._objects = itertools.count()

    async def attach(self, req: AttachRequest) -> dict[str, Any]:
        """Claim and hot-add ``req.devices`` (with ``req.held``); the control answer."""
        async with self._lock:
            if self.vm.qmp is None or self.vm.qmp.closed:
                raise ControlError("no_qmp", "the VMM's QMP monitor is gone")
            present = self.vm.bdfs()
            taken = [bdf for bdf in (*req.devices, *req.held) if bdf in present]
            if taken:
                raise ControlError("busy", f"{taken[0]} is already in this VM", bdf=taken[0])
            t0 = time.monotonic()
            try:
                claims = await self.vm.claim(req.devices + req.held)
            except IommudError as exc:
                raise ControlError(exc.code.value, exc.message, **exc.details) from None
            claim_s = time.monotonic() - t0
            added = []
            try:
                for i, claim in enumerate(claims):
                    try:
                        added.append(await self._add(claim, req))
                    except ControlError:
                        await self.vm.give_back(claims[i + 1 :])
                        raise
            finally:
                for claim in claims:
                    claim.close()  # QEMU has its copies, the daemon its duplicates
            done = time.monotonic()
            self.vm.report(
                "vm.attached",
                leases=added,
                claim_s=claim_s,
                hotplug_s=done - t0,
                qmp_s=done - t0 - claim_s,
            )
            return {"leases": added, "claim_s": claim_s, "hotplug_s": done - t0}

    async def _getfd(self, fd: int) -> str:
        assert self.vm.qmp is not None
        name = f"iommuctl-fd{next(self._names)}"
        await self.vm.qmp.execute("getfd", {"fdname": name}, fds=[fd])
        return name

    async def _add(self, claim: DelegatedClaim, req: AttachRequest) -> dict[str, Any]:
        """One claim into the VM; on a QMP error it is undone and given back."""
        qmp = self.vm.qmp
        assert qmp is not None
        lease = VmLease(claim.lease_id, claim.group_id)
        names: list[str] = []
        created: str | None = None
        try:
            if self.vm.iommufd_object is None:
                if claim.iommufd is None:  # pragma: no cover - the daemon broke v2
                    raise ControlError("qmp_error", "no iommufd for a VM that has none")
                name = await self._getfd(claim.iommufd.fileno())
                names.append(name)
                created = f"{HOTPLUG_IOMMUFD}{next(self._objects)}"
                await qmp.execute("object-add", {"qom-type": "iommufd", "id": created, "fd": name})
                names.remove(name)  # consumed by the object
                self.vm.iommufd_object = created
            for dev in claim.devices:
                if dev.bdf in req.held:
                    lease.held.append(dev.bdf)
                    continue
                i = req.devices.index(dev.bdf)
                qdev_id = req.ids[i] or qdev_id_for(dev.bdf)
                name = await self._getfd(dev.fd.fileno())
                names.append(name)
                args = {"driver": "vfio-pci", "id": qdev_id, "fd": name}
                args["iommufd"] = self.vm.iommufd_object or ""  # set above when it was None
                bus = req.buses[i]
                if bus is not None:
                    args["bus"] = bus
                await qmp.execute("device_add", args)
                names.remove(name)
                lease.devices.append(VmDevice(dev.bdf, qdev_id))
        except (QmpError, QmpClosedError) as exc:
            await self._undo(claim, lease, names, created)
            raise ControlError("qmp_error", str(exc), lease_id=claim.lease_id) from None
        self.vm.leases[lease.lease_id] = lease
        return lease.describe()

    async def _undo(
        self, claim: DelegatedClaim, lease: VmLease, names: list[str], created: str | None
    ) -> None:
        """Drop the named fds QEMU still holds; if no device of the claim got in, the
        iommufd object made for it goes and the claim is given back (part of a group in
        the VM keeps its lease: QEMU holds those devices)."""
        qmp = self.vm.qmp
        assert qmp is not None
        with contextlib.suppress(QmpError, QmpClosedError):
            for name in names:
                await qmp.execute("closefd", {"fdname": name})
        if lease.devices:
            self.vm.leases[lease.lease_id] = lease
            return
        if created is not None:
            with contextlib.suppress(QmpError, QmpClosedError):
                await qmp.execute("object-del", {"id": created})
            self.vm.iommufd_object = None
        await self.vm.give_back([claim])
