"""IOAS objects and their mappings: create, destroy, map client fds, unmap.

An IOAS is either an iommufd IOAS in the session's own /dev/iommu, or (legacy path) a
VFIO type1v2 container. A map request carries client fds; each must be a memfd sealed
against shrinking (F_SEAL_SHRINK, so the pages the IOMMU pins cannot vanish under it),
each range page-aligned and inside its file, each fixed IOVA aligned, inside the allowed
ranges and clear of existing mappings. Quotas (pinned bytes, mapping count) are checked
before anything is pinned. Pinning uses IOMMU_IOAS_MAP_FILE when the kernel has it;
otherwise the daemon mmaps the range itself (MAP_SHARED, kept until unmap) and maps its
own address (IOMMU_IOAS_MAP, or VFIO_IOMMU_MAP_DMA on a container). A request with several
ranges is all-or-nothing: a failure unmaps what the request already mapped.

Pinning and unpinning run in worker threads (they can take long for large ranges); the
caller serialises requests per session. No policy beyond the session's quota here.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import mmap
import os
from collections.abc import Sequence
from typing import Final

import structlog

from iommud.broker.plan import check_ioas_quota, unknown_ioas
from iommud.broker.state import IoasMapping, IoasState, Session
from iommud.errors import (
    BadRequestError,
    InvalidRangeError,
    InvalidStateError,
    KernelError,
    NotFoundError,
    OverlapError,
    QuotaExceededError,
)
from iommud.fds import FdSet
from iommud.host.viability import ClaimPath
from iommud.kernel import aio
from iommud.kernel.interface import IommuFd, IovaRange, Kernel, MapFlag
from iommud.kernel.memory import DaemonMap, inspect_file
from iommud.protocol.messages import MappedRange, MapRange

log = structlog.get_logger(__name__)

PAGE: Final = mmap.PAGESIZE
VFIO_TYPE1V2_IOMMU: Final = 3
# The legacy container's IOVA space as assumed by the daemon: the kernel interface has no
# VFIO_IOMMU_GET_INFO yet, so keep below QEMU/VT-d's 39-bit default width and out of the
# x86 MSI window (0xfee00000, include/uapi/linux/vfio.h, iova range capability).
LEGACY_IOVA_RANGES: Final = (IovaRange(0, 0xFEDFFFFF), IovaRange(0xFEF00000, (1 << 39) - 1))


def _check_fd(index: int, r: MapRange, fd: int) -> None:
    """The fd is a sealed memfd/regular file and the range lies inside it."""
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


class IoasManager:
    """IOAS operations on a session's state, through the kernel interface."""

    def __init__(self, kernel: Kernel) -> None:
        self._kernel = kernel

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

    def create(self, session: Session, backend: ClaimPath) -> IoasState:
        check_ioas_quota(session.quota, len(session.ioases))
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
            session.ioases.pop(ioas.ioas_id, None)
            if ioas.kernel_id is not None and session.iommufd is not None:
                try:
                    await aio.call("IOMMU_DESTROY", session.iommufd.destroy, ioas.kernel_id)
                except KernelError as exc:
                    log.warning("ioas.destroy_failed", ioas_id=ioas.ioas_id, errno=exc.errno)
            if ioas.container is not None:
                ioas.container.close()
            log.info("ioas.destroyed", session=session.session_id, ioas_id=ioas.ioas_id)

    def iova_ranges(self, session: Session, ioas: IoasState) -> tuple[list[IovaRange], int]:
        if ioas.backend is ClaimPath.IOMMUFD:
            assert ioas.kernel_id is not None
            return self.iommufd(session).ioas_iova_ranges(ioas.kernel_id)
        return list(LEGACY_IOVA_RANGES), PAGE

    # ------------------------------------------------------------------ map
    async def map(
        self, session: Session, ioas: IoasState, ranges: Sequence[MapRange], fds: FdSet
    ) -> list[MappedRange]:
        """Validate everything, check quotas, then pin range by range (all-or-nothing)."""
        if ioas.backend is ClaimPath.LEGACY and not ioas.container_ready:
            raise InvalidStateError(
                f"legacy IOAS {ioas.ioas_id} takes maps only once a group is attached",
                ioas_id=ioas.ioas_id,
            )
        allowed, align = self.iova_ranges(session, ioas)
        align = max(align, PAGE)
        for i, r in enumerate(ranges):
            if r.fd_index >= len(fds):
                raise BadRequestError(
                    f"range {i}: no fd {r.fd_index}", range=i, fd_index=r.fd_index, fds=len(fds)
                )
            _check_fd(i, r, fds[r.fd_index].fileno())
            if r.length % align:
                raise InvalidRangeError(
                    f"range {i}: length must be a multiple of the IOVA alignment {align:#x}",
                    range=i,
                    reason="misaligned",
                    length=r.length,
                    alignment=align,
                )
        self._check_quota(session, ranges)
        taken: list[tuple[int, int]] = [(m.iova, m.last) for m in ioas.mappings.values()]
        for i, r in enumerate(ranges):
            if r.iova is not None:
                self._check_iova(i, r.iova, r.length, allowed, align, ioas, taken)
                taken.append((r.iova, r.iova + r.length - 1))
        # Fixed ranges first so a kernel-chosen IOVA cannot take a spot a later fixed
        # range of the same request asked for.
        order = sorted(range(len(ranges)), key=lambda i: ranges[i].iova is None)
        done: list[IoasMapping] = []
        results: dict[int, IoasMapping] = {}
        try:
            for i in order:
                r = ranges[i]
                iova = r.iova
                if iova is None and ioas.backend is ClaimPath.LEGACY:
                    iova = _pick_iova(r.length, allowed, align, taken)
                    taken.append((iova, iova + r.length - 1))
                m = await self._map_one(session, ioas, r, fds[r.fd_index].fileno(), iova)
                done.append(m)
                results[i] = m
        except BaseException:
            await asyncio.shield(self._undo(session, ioas, done))
            raise
        for m in done:
            ioas.mappings[m.iova] = m
        total = sum(m.length for m in done)
        log.info(
            "ioas.mapped",
            session=session.session_id,
            ioas_id=ioas.ioas_id,
            ranges=len(done),
            bytes=total,
            pinned_total=session.pinned_bytes,
            via="map_file" if done and done[0].mm is None else "mmap",
        )
        return [
            MappedRange(iova=results[i].iova, length=results[i].length) for i in range(len(ranges))
        ]

    @staticmethod
    def _check_quota(session: Session, ranges: Sequence[MapRange]) -> None:
        q = session.quota
        want = sum(r.length for r in ranges)
        used = session.pinned_bytes
        if used + want > q.pinned_bytes:
            raise QuotaExceededError(
                f"pinned-bytes quota exceeded: {used} used + {want} requested > {q.pinned_bytes}",
                quota="pinned_bytes",
                limit=q.pinned_bytes,
                used=used,
                requested=want,
            )
        count = session.mapping_count
        if count + len(ranges) > q.max_mappings:
            raise QuotaExceededError(
                f"mapping-count quota exceeded: {count} + {len(ranges)} > {q.max_mappings}",
                quota="max_mappings",
                limit=q.max_mappings,
                used=count,
                requested=len(ranges),
            )

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
        if not any(a.start <= iova and last <= a.last for a in allowed):
            raise InvalidRangeError(
                f"range {i}: IOVA [{iova:#x}, {last:#x}] is outside the allowed ranges",
                range=i,
                reason="outside_allowed",
                iova=iova,
                length=length,
                allowed=[{"start": a.start, "last": a.last} for a in allowed],
            )
        for start, end in taken:
            if start <= last and iova <= end:
                raise OverlapError(
                    f"range {i}: IOVA [{iova:#x}, {last:#x}] overlaps [{start:#x}, {end:#x}]",
                    range=i,
                    iova=iova,
                    length=length,
                    conflict={"iova": start, "length": end - start + 1},
                )

    async def _map_one(
        self, session: Session, ioas: IoasState, r: MapRange, fd: int, iova: int | None
    ) -> IoasMapping:
        flags = (MapFlag.READABLE if r.read else MapFlag(0)) | (
            MapFlag.WRITEABLE if r.write else MapFlag(0)
        )
        if ioas.backend is ClaimPath.IOMMUFD:
            ictx = self.iommufd(session)
            kid = ioas.kernel_id
            assert kid is not None
            if await aio.call("IOMMU_IOAS_MAP_FILE probe", ictx.has_map_file):
                got = await aio.call(
                    "IOMMU_IOAS_MAP_FILE",
                    ictx.ioas_map_file,
                    kid,
                    fd,
                    r.offset,
                    r.length,
                    iova,
                    flags,
                )
                return IoasMapping(got, r.length)
        dmap = self._daemon_map(fd, r)
        try:
            if ioas.backend is ClaimPath.IOMMUFD:
                assert dmap.addr is not None
                assert ioas.kernel_id is not None
                got = await aio.call(
                    "IOMMU_IOAS_MAP",
                    self.iommufd(session).ioas_map,
                    ioas.kernel_id,
                    dmap.addr,
                    r.length,
                    iova,
                    flags,
                )
            else:
                container = ioas.container
                assert container is not None
                assert iova is not None
                assert dmap.addr is not None
                await aio.call(
                    "VFIO_IOMMU_MAP_DMA",
                    container.map_dma,
                    dmap.addr,
                    iova,
                    r.length,
                    read=r.read,
                    write=r.write,
                )
                got = iova
        except BaseException:
            dmap.close()
            raise
        return IoasMapping(got, r.length, mm=dmap)

    @staticmethod
    def _daemon_map(fd: int, r: MapRange) -> DaemonMap:
        try:
            return DaemonMap(fd, r.offset, r.length, write=r.write)
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
            return await aio.call(
                "IOMMU_IOAS_UNMAP", self.iommufd(session).ioas_unmap, ioas.kernel_id, iova, length
            )
        assert ioas.container is not None
        return await aio.call("VFIO_IOMMU_UNMAP_DMA", ioas.container.unmap_dma, iova, length)

    # ------------------------------------------------------------------ unmap
    async def unmap(self, session: Session, ioas: IoasState, iova: int, length: int) -> int:
        """Unmap whole mappings inside [iova, iova+length); never splits one."""
        last = iova + length - 1
        hit = [m for m in ioas.mappings.values() if m.iova <= last and iova <= m.last]
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
        for m in sorted(hit, key=lambda m: m.iova):
            total += await asyncio.shield(self._unmap_mapping(session, ioas, m))
        log.info(
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
        ioas.mappings.pop(m.iova, None)
        if m.mm is not None:
            m.mm.close()
        return n

    async def unmap_all(self, session: Session, ioas: IoasState) -> int:
        """Block DMA through this IOAS: unmap everything, then drop the daemon's mmaps."""
        if not ioas.mappings:
            return 0
        try:
            if ioas.backend is ClaimPath.IOMMUFD:
                assert ioas.kernel_id is not None
                assert session.iommufd is not None
                n = await aio.call(
                    "IOMMU_IOAS_UNMAP", session.iommufd.ioas_unmap_all, ioas.kernel_id
                )
            else:
                assert ioas.container is not None
                n = await aio.call("VFIO_IOMMU_UNMAP_DMA", ioas.container.unmap_all)
        except KernelError as exc:
            if exc.errno != errno.ENOENT:
                raise
            n = 0
        for m in ioas.mappings.values():
            if m.mm is not None:
                m.mm.close()
        ioas.mappings.clear()
        log.info("ioas.unmapped_all", session=session.session_id, ioas_id=ioas.ioas_id, bytes=n)
        return n


def _pick_iova(
    length: int, allowed: Sequence[IovaRange], align: int, taken: list[tuple[int, int]]
) -> int:
    """Lowest aligned IOVA with room for ``length`` (legacy containers choose none)."""
    busy = sorted(taken)
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
