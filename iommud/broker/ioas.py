"""IOAS objects and their mappings: create, destroy, map client fds, unmap.

An IOAS is either an iommufd IOAS in the session's own /dev/iommu, or (legacy path) a
VFIO type1v2 container. A map request carries client fds; each must be a memfd sealed
against shrinking (F_SEAL_SHRINK, so the pages the IOMMU pins cannot vanish under it),
each range page-aligned and inside its file, each fixed IOVA aligned, inside the allowed
ranges and clear of existing mappings, read and/or write. IOAS requests need an access
rule (iommud.policy.check_ioas). Quotas (pinned bytes, mapping count, IOASes, the
daemon's file mappings) are per uid over all its connections and daemon-wide
(iommud.broker.ledger); they are reserved before anything is pinned and given back on
failure and at unmap. Pinning uses IOMMU_IOAS_MAP_FILE when the kernel has it;
otherwise the daemon maps its own address (IOMMU_IOAS_MAP, or VFIO_IOMMU_MAP_DMA on a
container) inside its one mapping of the client's file (iommud.broker.filemaps),
faulting the range in with one madvise first. A request with several ranges is
all-or-nothing: a failure unmaps what the request already mapped.

Cost per request does not grow with the state held: the overlap and unmap lookups bisect
the IOAS's sorted IOVAs, the usage counters are kept, the allowed IOVA ranges are read
once per attach/detach (``IoasState.forget_ranges``). Whether a pin leaves the loop is
``iommud.kernel.aio``'s decision (small ones run inline). The caller serialises
requests per session. No policy beyond the access rule and the quotas here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import mmap
import os
from collections.abc import Sequence
from typing import Final

import structlog

from iommud.broker.filemaps import FileMaps, Hold
from iommud.broker.ledger import Ledger
from iommud.broker.plan import check_ioas_quota, unknown_ioas
from iommud.broker.state import IoasMapping, IoasState, Session
from iommud.config import Config, MemoryLimits
from iommud.eager import shielded
from iommud.errors import (
    BadRequestError,
    InvalidRangeError,
    InvalidStateError,
    KernelError,
    NotFoundError,
    OverlapError,
    PermissionDeniedError,
)
from iommud.fds import FdSet
from iommud.host.viability import ClaimPath
from iommud.kernel import aio
from iommud.kernel.interface import IommuFd, IovaRange, Kernel, MapFlag
from iommud.kernel.memory import FileInfo, inspect_file, max_map_count
from iommud.policy import check_ioas
from iommud.protocol.messages import MappedRange, MapRange

log = structlog.get_logger(__name__)

PAGE: Final = mmap.PAGESIZE
VFIO_TYPE1V2_IOMMU: Final = 3
# The legacy container's IOVA space as assumed by the daemon: the kernel interface has no
# VFIO_IOMMU_GET_INFO yet, so keep below QEMU/VT-d's 39-bit default width and out of the
# x86 MSI window (0xfee00000, include/uapi/linux/vfio.h, iova range capability).
LEGACY_IOVA_RANGES: Final = (IovaRange(0, 0xFEDFFFFF), IovaRange(0xFEF00000, (1 << 39) - 1))

# (read, write) -> the map flags: enum.Flag arithmetic cost microseconds on every map
_ACCESS: Final = {
    (read, write): (MapFlag.READABLE if read else MapFlag(0))
    | (MapFlag.WRITEABLE if write else MapFlag(0))
    for read in (False, True)
    for write in (False, True)
}


def _check_fd(index: int, r: MapRange, fd: int) -> FileInfo:
    """The fd is a sealed memfd/regular file and the range lies inside it."""
    if not (r.read or r.write):
        raise BadRequestError(
            f"range {index}: read and write are both false (a mapping the device could not use)",
            range=index,
            reason="no_access",
        )
    try:
        st = inspect_file(fd)
    except KernelError as exc:
        raise BadRequestError(
            f"range {index}: fd {r.fd_index} cannot be inspected",
            range=index,
            fd_index=r.fd_index,
            errno=exc.errno,
        ) from exc
    if not st.is_regular:
        raise BadRequestError(
            f"range {index}: fd {r.fd_index} is not a memfd or regular file",
            range=index,
            fd_index=r.fd_index,
            reason="not_a_file",
        )
    seals = st.seals
    if not st.has_seals(fcntl.F_SEAL_SHRINK):
        raise BadRequestError(
            f"range {index}: fd {r.fd_index} is not sealed against shrinking "
            "(memfd_create with MFD_ALLOW_SEALING, then F_ADD_SEALS F_SEAL_SHRINK)",
            range=index,
            fd_index=r.fd_index,
            reason="not_sealed",
            seals=seals,
            required="F_SEAL_SHRINK",
        )
    if r.offset % PAGE or r.length % PAGE:
        raise InvalidRangeError(
            f"range {index}: offset and length must be multiples of the page size {PAGE}",
            range=index,
            reason="misaligned",
            offset=r.offset,
            length=r.length,
            page_size=PAGE,
        )
    if r.offset + r.length > st.size:
        raise InvalidRangeError(
            f"range {index}: [{r.offset:#x}, +{r.length:#x}) is outside the file "
            f"(size {st.size:#x})",
            range=index,
            reason="outside_file",
            offset=r.offset,
            length=r.length,
            file_size=st.size,
        )
    return st


def memory_limits(limits: MemoryLimits, map_count: int | None) -> MemoryLimits:
    """``limits`` with ``max_memfds`` capped at a quarter of vm.max_map_count: the
    daemon's own heap, libraries and thread stacks keep the other three quarters."""
    if map_count is None or limits.max_memfds <= map_count // 4:
        return limits
    return limits.model_copy(update={"max_memfds": map_count // 4})


class IoasManager:
    """IOAS operations on a session's state, through the kernel interface.

    ``ledger`` holds every uid's usage (per uid and daemon-wide limits); ``filemaps``
    the daemon's mappings of client files.
    """

    def __init__(self, kernel: Kernel, config: Config) -> None:
        self._kernel = kernel
        self._config = config
        limits = memory_limits(config.memory, max_map_count())
        if limits is not config.memory:
            log.warning(
                "memory.max_memfds_capped",
                configured=config.memory.max_memfds,
                capped_to=limits.max_memfds,
            )
        self.ledger = Ledger(limits)
        self.filemaps = FileMaps(self.ledger)

    # ------------------------------------------------------------------ objects
    def iommufd(self, session: Session) -> IommuFd:
        """The session's /dev/iommu, opened on first use."""
        if session.iommufd is None:
            session.iommufd = self._kernel.open_iommufd()
            log.info("iommufd.opened", session=session.session_id)
        return session.iommufd

    def get(self, session: Session, ioas_id: int) -> IoasState:
        ioas = session.ioases.get(ioas_id)
        if ioas is None:
            raise unknown_ioas(ioas_id)
        return ioas

    def check_allowed(self, session: Session) -> None:
        """IOAS requests need an access rule (iommud.policy.check_ioas)."""
        if session.may_use_ioas:
            return
        ident = session.identity
        decision = check_ioas(self._config, ident)
        raise PermissionDeniedError(
            f"IOAS requests denied: {decision.reason}",
            uid=ident.uid,
            gid=ident.gid,
            rule=None,
            reason=decision.code or decision.reason,
        )

    def create(self, session: Session, backend: ClaimPath) -> IoasState:
        self.check_allowed(session)
        uid = session.identity.uid
        check_ioas_quota(session.quota, len(session.ioases))
        self.ledger.check(uid, session.quota, ioas=1)
        ioas_id = session.next_ioas_id
        if backend is ClaimPath.IOMMUFD:
            ioas = IoasState(ioas_id, backend, kernel_id=self.iommufd(session).ioas_alloc())
        else:
            container = self._kernel.open_container()
            try:
                has_type1v2 = container.check_extension(VFIO_TYPE1V2_IOMMU)
            except BaseException:
                container.close()
                raise
            if not has_type1v2:
                container.close()
                raise KernelError(
                    "check_extension", errno.ENOTSUP, "the VFIO container has no type1v2 IOMMU"
                )
            ioas = IoasState(ioas_id, backend, container=container)
        session.next_ioas_id += 1
        session.ioases[ioas_id] = ioas
        self.ledger.charge(uid, ioas=1)
        log.info(
            "ioas.created",
            session=session.session_id,
            ioas_id=ioas_id,
            backend=str(backend),
            kernel_id=ioas.kernel_id,
        )
        return ioas

    async def destroy(self, session: Session, ioas: IoasState, *, force: bool = False) -> None:
        """Unmap everything and free the IOAS. Refused while devices use it (unless force)."""
        if ioas.groups and not force:
            raise InvalidStateError(
                f"IOAS {ioas.ioas_id} still has devices attached (groups "
                f"{sorted(ioas.groups)}): release them first",
                ioas_id=ioas.ioas_id,
                groups=sorted(ioas.groups),
            )
        try:
            await self.unmap_all(session, ioas)
        finally:
            if session.ioases.pop(ioas.ioas_id, None) is ioas:
                self.ledger.refund(session.identity.uid, ioas=1)
            if ioas.kernel_id is not None and session.iommufd is not None:
                try:
                    await aio.call("IOMMU_DESTROY", session.iommufd.destroy, ioas.kernel_id)
                except KernelError as exc:
                    log.warning("ioas.destroy_failed", ioas_id=ioas.ioas_id, errno=exc.errno)
            if ioas.container is not None:
                ioas.container.close()
            log.info("ioas.destroyed", session=session.session_id, ioas_id=ioas.ioas_id)

    async def drop_if_unused(self, session: Session, ioas: IoasState) -> None:
        """Destroy an IOAS a claim made once no device and no mapping uses it any more
        (at the release, or at the unmap of its last mapping after it): a VMM that
        claims and releases in a loop must not collect IOASes until max_ioas refuses it.
        An IOAS from ioas_create lives until ioas_destroy or the connection's end."""
        if (
            ioas.by_claim
            and not ioas.groups
            and not ioas.mappings
            and session.ioases.get(ioas.ioas_id) is ioas
        ):
            await self.destroy(session, ioas)

    def iova_ranges(self, session: Session, ioas: IoasState) -> tuple[list[IovaRange], int]:
        ranges, align = self._allowed(session, ioas)
        return list(ranges), align

    def _allowed(self, session: Session, ioas: IoasState) -> tuple[tuple[IovaRange, ...], int]:
        """The allowed IOVA ranges, read from the kernel once per attach/detach."""
        if ioas.backend is not ClaimPath.IOMMUFD:
            return LEGACY_IOVA_RANGES, PAGE
        if ioas.ranges_cache is None:
            assert ioas.kernel_id is not None
            ranges, align = self.iommufd(session).ioas_iova_ranges(ioas.kernel_id)
            ioas.ranges_cache = (tuple(ranges), align)
        return ioas.ranges_cache

    # ------------------------------------------------------------------ map
    async def map(
        self, session: Session, ioas: IoasState, ranges: Sequence[MapRange], fds: FdSet
    ) -> list[MappedRange]:
        """Validate everything, reserve the quota, then pin range by range (all-or-nothing)."""
        self.check_allowed(session)
        if ioas.backend is ClaimPath.LEGACY and not ioas.container_ready:
            raise InvalidStateError(
                f"legacy IOAS {ioas.ioas_id} takes maps only once a group is attached",
                ioas_id=ioas.ioas_id,
            )
        allowed, align = self._allowed(session, ioas)
        align = max(align, PAGE)
        infos: list[FileInfo] = []
        nfds = len(fds)
        want = 0
        for i, r in enumerate(ranges):
            if r.fd_index >= nfds:
                raise BadRequestError(
                    f"range {i}: no fd {r.fd_index}", range=i, fd_index=r.fd_index, fds=nfds
                )
            infos.append(_check_fd(i, r, fds[r.fd_index].fileno()))
            if r.length % align:
                raise InvalidRangeError(
                    f"range {i}: length must be a multiple of the IOVA alignment {align:#x}",
                    range=i,
                    reason="misaligned",
                    length=r.length,
                    alignment=align,
                )
            want += r.length
        uid = session.identity.uid
        count = len(ranges)
        self.ledger.check(uid, session.quota, pinned_bytes=want, mappings=count)
        taken: list[tuple[int, int]] = []  # this request's own fixed ranges
        floating = False  # some range lets the kernel (or _pick_iova) choose its IOVA
        for i, r in enumerate(ranges):
            if r.iova is None:
                floating = True
            else:
                self._check_iova(i, r.iova, r.length, allowed, align, ioas, taken)
                taken.append((r.iova, r.iova + r.length - 1))
        # Reserved now: another connection of the uid cannot pass the check while this
        # request pins off the loop. Given back below if anything fails.
        self.ledger.charge(uid, pinned_bytes=want, mappings=count)
        # Fixed ranges first so a kernel-chosen IOVA cannot take a spot a later fixed
        # range of the same request asked for.
        order: Sequence[int] = range(count)
        if floating:
            order = sorted(order, key=lambda i: ranges[i].iova is None)
        done: list[IoasMapping] = []
        results: dict[int, IoasMapping] = {}
        try:
            for i in order:
                r = ranges[i]
                iova = r.iova
                if iova is None and ioas.backend is ClaimPath.LEGACY:
                    iova = _pick_iova(r.length, allowed, align, ioas, taken)
                    taken.append((iova, iova + r.length - 1))
                fd = fds[r.fd_index].fileno()
                m = await self._map_one(session, ioas, r, fd, infos[i], iova)
                done.append(m)
                results[i] = m
        except BaseException:
            self.ledger.refund(uid, pinned_bytes=want, mappings=count)
            await asyncio.shield(self._undo(session, ioas, done))
            raise
        for m in done:
            ioas.add_mapping(m)
        log.debug(
            "ioas.mapped",
            session=session.session_id,
            ioas_id=ioas.ioas_id,
            ranges=len(done),
            bytes=want,
            via="map_file" if done and done[0].mm is None else "mmap",
        )
        return [MappedRange(iova=results[i].iova, length=results[i].length) for i in range(count)]

    @staticmethod
    def _check_iova(
        i: int,
        iova: int,
        length: int,
        allowed: Sequence[IovaRange],
        align: int,
        ioas: IoasState,
        taken: list[tuple[int, int]],
    ) -> None:
        last = iova + length - 1
        if iova % align:
            raise InvalidRangeError(
                f"range {i}: IOVA {iova:#x} is not aligned to {align:#x}",
                range=i,
                reason="misaligned",
                iova=iova,
                alignment=align,
            )
        for a in allowed:
            if a.start <= iova and last <= a.last:
                break
        else:
            raise InvalidRangeError(
                f"range {i}: IOVA [{iova:#x}, {last:#x}] is outside the allowed ranges",
                range=i,
                reason="outside_allowed",
                iova=iova,
                length=length,
                allowed=[{"start": a.start, "last": a.last} for a in allowed],
            )
        hits = [(m.iova, m.last) for m in ioas.overlapping(iova, last)[:1]]
        if taken:
            hits += [(s, e) for s, e in taken if s <= last and iova <= e]
        if hits:
            start, end = min(hits)
            raise OverlapError(
                f"range {i}: IOVA [{iova:#x}, {last:#x}] overlaps [{start:#x}, {end:#x}]",
                range=i,
                iova=iova,
                length=length,
                conflict={"iova": start, "length": end - start + 1},
            )

    async def _map_one(
        self,
        session: Session,
        ioas: IoasState,
        r: MapRange,
        fd: int,
        info: FileInfo,
        iova: int | None,
    ) -> IoasMapping:
        flags = _ACCESS[r.read, r.write]
        if ioas.backend is ClaimPath.IOMMUFD:
            ictx = self.iommufd(session)
            kid = ioas.kernel_id
            assert kid is not None
            if await aio.call("IOMMU_IOAS_MAP_FILE probe", ictx.has_map_file):
                got = await aio.pin(
                    "IOMMU_IOAS_MAP_FILE",
                    r.length,
                    ictx.ioas_map_file,
                    kid,
                    fd,
                    r.offset,
                    r.length,
                    iova,
                    flags,
                )
                return IoasMapping(got, r.length)
        hold = self._hold(session, fd, info, r)
        try:
            got = await self._pin_daemon_range(session, ioas, hold, r, iova, flags)
        except BaseException:
            hold.close()
            raise
        return IoasMapping(got, r.length, mm=hold)

    async def _pin_daemon_range(
        self,
        session: Session,
        ioas: IoasState,
        hold: Hold,
        r: MapRange,
        iova: int | None,
        flags: MapFlag,
    ) -> int:
        """Pin the range of the daemon's mapping. Cold (never faulted in by the daemon, or
        not all resident any more): fault it in with one madvise first, then pin, inline
        or on a worker as ``aio.pin`` decides. Warm: pin straight away, as
        ``aio.pin_resident`` decides (iommud.broker.filemaps)."""
        shared = hold.shared
        dmap = shared.dmap
        addr = hold.addr + r.offset
        # Up to what a cold pin may do inline the record alone decides (one syscall less
        # per map: mincore cost 0.4-0.7 ms in the emulated lab); above it, so a range
        # punched out since never takes the larger resident limit, mincore confirms.
        warm = shared.is_warm(r.offset, r.length, verify=r.length > aio.INLINE_PIN_BYTES)
        pin = aio.pin_resident if warm else aio.pin

        def populate() -> None:
            # Best effort: without it (EINVAL before 5.14) the pin faults page by page.
            if not warm:
                with contextlib.suppress(KernelError):
                    dmap.populate(r.offset, r.length)

        if ioas.backend is ClaimPath.IOMMUFD:
            ictx = self.iommufd(session)
            kid = ioas.kernel_id
            assert kid is not None
            if warm:  # nothing to fault in: the ioctl itself, without a wrapper per map
                return await pin(
                    "IOMMU_IOAS_MAP", r.length, ictx.ioas_map, kid, addr, r.length, iova, flags
                )

            def map_iommufd() -> int:
                populate()
                return ictx.ioas_map(kid, addr, r.length, iova, flags)

            got = await pin("IOMMU_IOAS_MAP", r.length, map_iommufd)
        else:
            container = ioas.container
            assert container is not None
            assert iova is not None
            got = iova

            def map_container() -> None:
                populate()
                container.map_dma(addr, got, r.length, read=r.read, write=r.write)

            await pin("VFIO_IOMMU_MAP_DMA", r.length, map_container)
        if not warm:
            shared.faulted.add(r.offset, r.offset + r.length)
        return got

    def _hold(self, session: Session, fd: int, info: FileInfo, r: MapRange) -> Hold:
        try:
            return self.filemaps.hold(
                session.identity.uid,
                session.quota,
                fd,
                info,
                write=r.write,
                end=r.offset + r.length,
            )
        except KernelError as exc:
            raise BadRequestError(
                f"fd {r.fd_index} cannot be mapped by the daemon ({os.strerror(exc.errno)}); "
                "send it read-write, without F_SEAL_WRITE, or ask write=false",
                fd_index=r.fd_index,
                errno=exc.errno,
                reason="mmap_failed",
            ) from exc

    async def _undo(self, session: Session, ioas: IoasState, done: list[IoasMapping]) -> None:
        for m in done:
            try:
                await self._kernel_unmap(session, ioas, m.iova, m.length)
            except KernelError as exc:
                log.exception(
                    "ioas.undo_failed", ioas_id=ioas.ioas_id, iova=m.iova, errno=exc.errno
                )
            if m.mm is not None:
                m.mm.close()

    async def _kernel_unmap(self, session: Session, ioas: IoasState, iova: int, length: int) -> int:
        if ioas.backend is ClaimPath.IOMMUFD:
            assert ioas.kernel_id is not None
            return await aio.pin_resident(
                "IOMMU_IOAS_UNMAP",
                length,
                self.iommufd(session).ioas_unmap,
                ioas.kernel_id,
                iova,
                length,
            )
        assert ioas.container is not None
        return await aio.pin_resident(
            "VFIO_IOMMU_UNMAP_DMA", length, ioas.container.unmap_dma, iova, length
        )

    # ------------------------------------------------------------------ unmap
    async def unmap(self, session: Session, ioas: IoasState, iova: int, length: int) -> int:
        """Unmap whole mappings inside [iova, iova+length); never splits one."""
        last = iova + length - 1
        hit = ioas.overlapping(iova, last)
        partial = [m for m in hit if m.iova < iova or m.last > last]
        if partial:
            m = partial[0]
            raise InvalidRangeError(
                f"[{iova:#x}, {last:#x}] would split the mapping at {m.iova:#x} "
                f"(+{m.length:#x}); unmap whole mappings",
                reason="splits_mapping",
                iova=iova,
                length=length,
                mapping={"iova": m.iova, "length": m.length},
            )
        if not hit:
            raise NotFoundError(
                f"nothing mapped in [{iova:#x}, {last:#x}]",
                ioas_id=ioas.ioas_id,
                iova=iova,
                length=length,
            )
        total = 0
        for m in hit:
            total += await shielded(self._unmap_mapping(session, ioas, m))
        log.debug(
            "ioas.unmapped",
            session=session.session_id,
            ioas_id=ioas.ioas_id,
            iova=iova,
            bytes=total,
            mappings=len(hit),
        )
        return total

    async def _unmap_mapping(self, session: Session, ioas: IoasState, m: IoasMapping) -> int:
        n = await self._kernel_unmap(session, ioas, m.iova, m.length)
        self._forget(session, ioas, [m])
        return n

    def _forget(self, session: Session, ioas: IoasState, gone: list[IoasMapping]) -> None:
        """Mappings the kernel no longer has: drop them, refund them, let go of the
        daemon's file mappings."""
        for m in gone:
            ioas.remove_mapping(m)  # a no-op after clear_mappings
        self.ledger.refund(
            session.identity.uid,
            pinned_bytes=sum(m.length for m in gone),
            mappings=len(gone),
        )
        for m in gone:
            if m.mm is not None:
                m.mm.close()

    async def unmap_all(self, session: Session, ioas: IoasState) -> int:
        """Block DMA through this IOAS: unmap everything, then drop the daemon's mmaps."""
        if not ioas.mappings:
            return 0
        try:
            if ioas.backend is ClaimPath.IOMMUFD:
                assert ioas.kernel_id is not None
                assert session.iommufd is not None
                n = await aio.pin_resident(
                    "IOMMU_IOAS_UNMAP",
                    ioas.pinned_bytes,
                    session.iommufd.ioas_unmap_all,
                    ioas.kernel_id,
                )
            else:
                assert ioas.container is not None
                n = await aio.pin_resident(
                    "VFIO_IOMMU_UNMAP_DMA", ioas.pinned_bytes, ioas.container.unmap_all
                )
        except KernelError as exc:
            if exc.errno != errno.ENOENT:
                raise
            n = 0
        gone = ioas.clear_mappings()
        self._forget(session, ioas, gone)
        log.info("ioas.unmapped_all", session=session.session_id, ioas_id=ioas.ioas_id, bytes=n)
        return n


def _pick_iova(
    length: int,
    allowed: Sequence[IovaRange],
    align: int,
    ioas: IoasState,
    taken: list[tuple[int, int]],
) -> int:
    """Lowest aligned IOVA with room for ``length`` (legacy containers choose none).

    A walk of the IOAS's mappings in IOVA order: linear, on the legacy path only, for a
    range that names no IOVA (iommufd lets the kernel choose)."""
    busy = sorted([(m.iova, m.last) for m in (ioas.mappings[s] for s in ioas.starts)] + taken)
    for a in allowed:
        cand = -(-a.start // align) * align
        for start, end in busy:
            if end < cand:
                continue
            if cand + length - 1 < start:
                break
            cand = -(-(end + 1) // align) * align
        if cand + length - 1 <= a.last:
            return cand
    raise InvalidRangeError(
        f"no free IOVA range of {length:#x} bytes", reason="no_space", length=length
    )
