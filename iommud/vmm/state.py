"""What one ``iommuctl vm`` knows about its VM: leases, devices, the iommufd, QMP.

``VmState`` is the one owner of that state; the launcher (start, supervision,
revocation) and the hotplug path both act on it. It also does the two things both need
from the daemon: delegated claims split by IOMMU group on ONE iommufd (``claim``: all or
nothing) and releases (``release``). The daemon drops a delegated iommufd with its last
lease (protocol/PROTOCOL.md section 12), so the VM's iommufd id and object are forgotten
then: a later hotplug gets a fresh iommufd and makes an object of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from iommud.client.aio import AsyncClient
from iommud.client.calls import ClientClosedError, DelegatedClaim
from iommud.errors import IommudError
from iommud.vmm.qmp import QmpClient

Report = Callable[..., None]
"""``report(event, **fields)``: one launcher record (``vm.started``, ``vm.revoked`` ...)."""


@dataclass(slots=True)
class VmDevice:
    """A device the VM has, by its QEMU id; ``deleted`` once QEMU said DEVICE_DELETED."""

    bdf: str
    qdev_id: str
    deleted: bool = False


@dataclass(slots=True)
class VmLease:
    """One delegated lease (one IOMMU group) and what became of its devices."""

    lease_id: int
    group_id: int
    devices: list[VmDevice] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # claimed, given to no one (--hold)
    revoked: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "lease_id": self.lease_id,
            "group_id": self.group_id,
            "devices": [{"bdf": d.bdf, "id": d.qdev_id} for d in self.devices],
            "held": list(self.held),
        }


@dataclass(eq=False)
class VmState:
    """The VM's leases, its daemon-side iommufd id and QEMU-side iommufd object id."""

    client: AsyncClient
    report: Report
    iommufd_object: str | None = None
    iommufd_id: int | None = None
    leases: dict[int, VmLease] = field(default_factory=dict)
    qmp: QmpClient | None = None

    def bdfs(self) -> set[str]:
        """Every device the VM holds a lease on (given to it or held)."""
        out = {d.bdf for lease in self.leases.values() for d in lease.devices}
        return out | {bdf for lease in self.leases.values() for bdf in lease.held}

    async def _groups(self, bdfs: Sequence[str]) -> list[list[str]]:
        """``bdfs`` split by IOMMU group (unknown devices alone: the daemon names them)."""
        group_of = {d.bdf: d.group_id for d in await self.client.list_devices()}
        groups: dict[object, list[str]] = {}
        for bdf in bdfs:
            key = group_of.get(bdf)
            groups.setdefault(bdf if key is None else key, []).append(bdf)
        return list(groups.values())

    async def claim(self, bdfs: Sequence[str]) -> list[DelegatedClaim]:
        """One delegated claim per group, all on the VM's iommufd; all or nothing.

        The caller owns the returned claims' fds (and records the leases it keeps)."""
        claims: list[DelegatedClaim] = []
        try:
            for group in await self._groups(bdfs):
                claim = await self.client.claim_delegated(group, self.iommufd_id)
                claims.append(claim)
                self.iommufd_id = claim.iommufd_id
        except BaseException:
            await self.give_back(claims)
            raise
        return claims

    async def give_back(self, claims: Sequence[DelegatedClaim]) -> None:
        """Close and release claims the VM did not take (a failed start or hotplug)."""
        for claim in claims:
            claim.close()
            with contextlib.suppress(IommudError, ClientClosedError):
                await self.client.release(claim.lease_id)
        self._forget_iommufd_if_unused()

    def _forget_iommufd_if_unused(self) -> None:
        if not self.leases:
            self.iommufd_id = None  # the daemon dropped it with its last lease
            self.iommufd_object = None  # QEMU's object holds that dead file now

    async def release(self, lease_id: int) -> None:
        """Release one lease of the VM (reported as vm.released or vm.release_failed)."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return
        self._forget_iommufd_if_unused()
        try:
            await self.client.release(lease_id)
        except (IommudError, ClientClosedError) as exc:
            self.report("vm.release_failed", lease_id=lease_id, error=str(exc))
        else:
            self.report("vm.released", lease_id=lease_id, group_id=lease.group_id)

    async def release_all(self) -> None:
        for lease_id in list(self.leases):
            await self.release(lease_id)
