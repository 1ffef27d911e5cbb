"""Delegated claims (protocol v2): the kernel side of handing a VMM its own iommufd.

A delegated claim does the host side of a claim like any other (plan, journal, pin,
rebind: iommud.broker.claim), then, instead of binding and attaching itself:

- opens a FRESH /dev/iommu and sets IOMMU_OPTION_RLIMIT_MODE to per-process before any
  object exists (drivers/iommu/iommufd/ioas.c iommufd_option_rlimit_mode: needs
  CAP_SYS_RESOURCE, EBUSY once the iommufd holds an object), so the pages the VMM pins
  count against the VMM's own RLIMIT_MEMLOCK; or reuses the session's delegated
  iommufd the claim names (several groups of one VM, one IOAS);
- opens each device's cdev WITHOUT binding it: the VMM binds it (VFIO_DEVICE_BIND_IOMMUFD
  refuses a file already bound, drivers/vfio/device_cdev.c), allocates its IOAS and maps
  its own memory (IOMMU_IOAS_MAP pins the caller's pages, iommufd/pages.c).

The daemon keeps its own fds of exactly the files it hands out (the client gets dups):
a binding lives on the open file, never on a second open of the cdev (vfio_main.c), so
only these let the daemon take the devices back. Taking back (release, client exit,
revoke): VFIO_DEVICE_DETACH_IOMMUFD_PT through the daemon's fd of each device (DMA
blocked at once; EINVAL when the VMM never bound: nothing to block), then, when no
healthy lease shares the iommufd, IOMMU_IOAS_UNMAP of everything in every IOAS of it
(unpins the VMM's memory). No ioctl lists an iommufd's objects: ids are allocated
first-fit from 1 (iommufd/main.c, xa_alloc on ictx->objects) and an id that is not an
IOAS answers ENOENT (iommufd_get_object with a type), so the daemon probes ids
1..UNMAP_SCAN_IDS.

No policy and no planning here (iommud.broker.plan decides); no sysfs.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from iommud.broker.state import DelegatedIommufd, Lease, LeasedDevice, LeaseState, Session
from iommud.errors import KernelError, NotDelegableError, NotFoundError
from iommud.host.snapshot import HostSnapshot
from iommud.kernel import aio
from iommud.kernel.interface import FileKey, IommuFd, Kernel, Processes, ProcessHolder, Scan

log = structlog.get_logger(__name__)

UNMAP_SCAN_IDS = 1024
"""Object ids probed for IOASes to empty. A VMM makes a handful of objects per device
(device, IOAS, hw pagetables); 1024 covers any sane VM at a few µs per probe."""


def delegated_iommufd(session: Session, iommufd_id: int) -> DelegatedIommufd:
    """The session's delegated iommufd ``iommufd_id``; another session's is not found."""
    found = session.delegated.get(iommufd_id)
    if found is None:
        raise NotFoundError(
            f"no delegated iommufd {iommufd_id} in this session", iommufd_id=iommufd_id
        )
    return found


def open_fresh_iommufd(kernel: Kernel, session: Session) -> DelegatedIommufd:
    """A new /dev/iommu with per-process accounting, registered in the session."""
    ictx = kernel.open_iommufd()
    try:
        _set_rlimit_mode(ictx)
    except BaseException:
        ictx.close()
        raise
    delegated = DelegatedIommufd(session.next_iommufd_id, ictx)
    session.next_iommufd_id += 1
    session.delegated[delegated.iommufd_id] = delegated
    return delegated


def _set_rlimit_mode(ictx: IommuFd) -> None:
    try:
        mode = ictx.option_rlimit_mode(True)
    except KernelError as exc:
        if exc.errno == errno.EPERM:
            raise NotDelegableError(
                "the daemon may not set per-process memory accounting on /dev/iommu "
                "(IOMMU_OPTION_RLIMIT_MODE needs CAP_SYS_RESOURCE)",
                reason="no_rlimit_mode",
                errno=exc.errno,
            ) from exc
        raise
    if not mode:  # read back: the kernel must say per-process now
        raise KernelError("IOMMU_OPTION", errno.EIO, "RLIMIT_MODE did not stick")


def open_unbound(
    kernel: Kernel, snap: HostSnapshot, devices: tuple[str, ...], out: list[LeasedDevice]
) -> None:
    """Open each device's cdev, unbound (the VMM binds it); appended to ``out`` at once
    so an unwind closes what was opened."""
    for bdf in devices:
        cdev = snap.devices[bdf].vfio_cdev
        if cdev is None:
            raise KernelError("open_cdev", errno.ENOENT, f"{bdf} has no VFIO cdev", bdf=bdf)
        out.append(LeasedDevice(bdf, kernel.open_cdev(cdev)))


def shares_healthy_lease(lease: Lease) -> bool:
    """Whether another, not revoked lease of a session that is not closing still uses
    ``lease``'s delegated iommufd."""
    assert lease.delegated is not None
    if lease.session.closing:
        return False
    leases = lease.session.leases
    return any(
        (other := leases.get(lid)) is not None and other.state is LeaseState.ACTIVE
        for lid in lease.delegated.leases
        if lid != lease.lease_id
    )


def detach_delegated(lease: Lease) -> None:
    """Detach every device of the lease through the daemon's fds: DMA blocked at once.

    Idempotent and worth repeating: the VMM holds the bound file and may re-attach in
    between. EINVAL: the VMM never bound the device (vfio_main.c: no access granted
    before a bind), so there is nothing to block yet."""
    for ld in lease.devices:
        if ld.device.closed:
            continue
        try:
            ld.device.detach_ioas()
            log.info("device.detached", bdf=ld.bdf, lease_id=lease.lease_id)
        except KernelError as exc:
            log.info("device.detach_skipped", bdf=ld.bdf, errno=exc.errno)
        ld.attached = False


async def unmap_delegated(lease: Lease, ids: int = UNMAP_SCAN_IDS) -> None:
    """Empty every IOAS of the lease's iommufd (the VMM's pages are unpinned)."""
    assert lease.delegated is not None
    unmapped = await aio.call("IOMMU_IOAS_UNMAP", unmap_every_ioas, lease.delegated.ictx, ids)
    log.info(
        "iommufd.unmapped",
        iommufd_id=lease.delegated.iommufd_id,
        lease_id=lease.lease_id,
        ioas=sorted(unmapped),
        bytes=sum(unmapped.values()),
    )


async def block_delegated(lease: Lease, *, unmap: bool, ids: int = UNMAP_SCAN_IDS) -> None:
    """:func:`detach_delegated`; with ``unmap``, also :func:`unmap_delegated`."""
    assert lease.delegated is not None
    detach_delegated(lease)
    if unmap:
        await unmap_delegated(lease, ids)


def unmap_every_ioas(ictx: IommuFd, ids: int = UNMAP_SCAN_IDS) -> dict[int, int]:
    """IOMMU_IOAS_UNMAP(all) of every IOAS among object ids 1..``ids``: ioas id -> bytes.

    Runs on the work pool (unpinning is proportional to the memory). ENOENT: no object,
    or not an IOAS. Any other error is logged and the scan goes on: unmap what can be.
    """
    out: dict[int, int] = {}
    if ictx.closed:
        return out
    for object_id in range(1, ids + 1):
        try:
            out[object_id] = ictx.ioas_unmap_all(object_id)
        except KernelError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("iommufd.unmap_failed", object_id=object_id, errno=exc.errno)
    return out


@dataclass(frozen=True, slots=True)
class Pinned:
    """What the processes holding one delegated iommufd have pinned (VmPin)."""

    bytes: int | None  # None: unknown (the scan failed)
    pids: tuple[int, ...] = ()


def mappers_of(
    delegated: DelegatedIommufd,
    scan: Scan,
    ictx_key: FileKey,
    device_keys: frozenset[FileKey],
    peer_tree: frozenset[int],
) -> list[ProcessHolder]:
    """The processes that can have pinned memory through ``delegated`` (pure).

    IOMMU_IOAS_MAP pins the CALLER's pages (iommufd/pages.c: source_mm = current->mm),
    so that is whoever holds the iommufd file: the VMM, not necessarily the daemon's
    peer (a launcher). Matched by node (iommud.kernel.procs), every /dev/iommu file looks
    alike, so a holder counts only if it also holds one of this iommufd's device files
    or is the peer or one of its descendants (``peer_tree``).
    """
    return [
        h
        for h in scan.holders
        if ictx_key in h.keys and (h.keys & device_keys or h.pid in peer_tree)
    ]


async def pinned_bytes(processes: Processes, sessions: Iterable[Session]) -> dict[int, Pinned]:
    """``id(DelegatedIommufd)`` -> its mappers' pinned bytes, for every delegated
    iommufd of ``sessions``: one scan of /proc on the work pool."""
    wanted: list[tuple[DelegatedIommufd, FileKey, frozenset[FileKey], int]] = []
    for session in sessions:
        for d in session.delegated.values():
            if d.ictx.closed:
                continue
            devs = frozenset(
                processes.file_key(ld.device.fileno())
                for lid in d.leases
                if (lease := session.leases.get(lid)) is not None
                for ld in lease.devices
                if not ld.device.closed
            )
            wanted.append((d, processes.file_key(d.ictx.fileno()), devs, session.identity.pid))
    if not wanted:
        return {}
    keys = frozenset(k for _, ik, dk, _ in wanted for k in (ik, *dk))

    def work() -> tuple[Scan, dict[int, int]]:
        return processes.scan(keys, vm_pin=True), processes.parents()

    try:
        scan, parents = await aio.call("holder_scan", work)
    except KernelError as exc:
        log.warning("status.pinned_unreadable", op=exc.op, errno=exc.errno)
        return {id(d): Pinned(None) for d, *_ in wanted}
    try:
        out: dict[int, Pinned] = {}
        for d, ictx_key, devs, peer in wanted:
            found = mappers_of(d, scan, ictx_key, devs, descendants(parents, peer))
            pins = [h.vm_pin for h in found]
            total = None if any(p is None for p in pins) else sum(p or 0 for p in pins)
            out[id(d)] = Pinned(total, tuple(sorted(h.pid for h in found)))
        return out
    finally:
        scan.close()


def descendants(parents: dict[int, int], root: int) -> frozenset[int]:
    """``root`` and every process below it in the ``parents`` (pid -> ppid) tree."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out = {root}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return frozenset(out)


def forget(lease: Lease) -> None:
    """The lease no longer uses its delegated iommufd; the last one closes the file
    (the client's VMM keeps its own copy: it only loses what the daemon could do)."""
    delegated = lease.delegated
    if delegated is None:
        return
    delegated.leases.discard(lease.lease_id)
    if not delegated.leases:
        lease.session.delegated.pop(delegated.iommufd_id, None)
        delegated.ictx.close()
        log.info("iommufd.closed", iommufd_id=delegated.iommufd_id)
