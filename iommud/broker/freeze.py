"""Revoke freezes: after a revoke, nothing in the session's iommufd may be mapped.

Why a revoke must freeze the whole iommufd (iommufd path): the client holds its own dup
of each device fd, and a VFIO cdev stays bound to the iommufd it was bound to until
EVERY fd of it is closed (the file's release does the unbind: drivers/vfio/vfio_main.c
vfio_device_fops_release -> vfio_df_unbind_iommufd). While bound, the client may call
VFIO_DEVICE_ATTACH_IOMMUFD_PT itself with any IOAS of that iommufd as ``pt_id``. So
detaching the revoked devices and unmapping their IOAS is not enough: the client could
re-attach a revoked device to another of its IOASes that still maps its memory.

The rule:

- A revoke of an iommufd lease records a Freeze on its session, then unmaps EVERY IOAS
  of the session's iommufd (the other leases of that client lose their mappings too).
- While any freeze holds, maps into any IOAS of that iommufd and new iommufd claims are
  refused with ``revoked``; the details name the revoked lease and group and what the
  freeze still waits for (``waiting_for``: ``release`` or ``device_fds_closed``).
- A freeze lifts only when the revoked lease has been released AND each revoked device
  is no longer bound in the iommufd, i.e. the client closed every copy of its fd
  (IommuFd.is_device_bound: IOMMU_GET_HW_INFO answers ENOENT once unbound). Claims are
  refused meanwhile so no new device bind can reuse a revoked device's id.
- It is checked when a map is attempted and after a release; the probe is one ioctl per
  revoked device. A probe that fails otherwise keeps the freeze (fail closed).

The legacy path needs none of this: a legacy device fd reaches only the container of
its group, which the revoke unmaps, and the daemon refuses maps into it.

Pure bookkeeping on the session plus the probe; never unmaps or detaches itself.
"""

from __future__ import annotations

import structlog

from iommud.broker.state import Freeze, Lease, Session
from iommud.errors import KernelError, RevokedError

log = structlog.get_logger(__name__)


def freeze(session: Session, lease: Lease, reason: str) -> Freeze:
    """Record that ``lease`` was revoked and its devices may still be bound."""
    f = Freeze(
        lease.lease_id,
        lease.group_id,
        reason,
        {ld.bdf: ld.devid for ld in lease.devices if ld.devid is not None},
    )
    session.freezes[lease.lease_id] = f
    log.warning(
        "iommufd.frozen",
        session=session.session_id,
        lease_id=lease.lease_id,
        group_id=lease.group_id,
        devices=sorted(f.devices),
    )
    return f


def _is_bound(session: Session, bdf: str, devid: int) -> bool:
    if session.iommufd is None or session.iommufd.closed:
        return False  # the session's iommufd is gone: nothing can be mapped into it
    try:
        return session.iommufd.is_device_bound(devid)
    except KernelError as exc:
        log.warning("iommufd.bound_probe_failed", bdf=bdf, devid=devid, errno=exc.errno)
        return True


def holding(session: Session) -> Freeze | None:
    """Lift the freezes whose conditions are met; the first one still holding, or None."""
    for lease_id, f in list(session.freezes.items()):
        if lease_id in session.leases:
            continue  # not released yet
        for bdf, devid in list(f.devices.items()):
            if not _is_bound(session, bdf, devid):
                del f.devices[bdf]
        if not f.devices:
            del session.freezes[lease_id]
            log.info(
                "iommufd.thawed",
                session=session.session_id,
                lease_id=lease_id,
                group_id=f.group_id,
            )
    return next(iter(session.freezes.values()), None)


def frozen_error(session: Session, f: Freeze, **extra: object) -> RevokedError:
    """The exact refusal while ``f`` holds."""
    released = f.lease_id not in session.leases
    waiting = "device_fds_closed" if released else "release"
    return RevokedError(
        f"lease {f.lease_id} (IOMMU group {f.group_id}) was revoked: this session's "
        "iommufd takes no maps until that lease is released and every copy of its "
        "device fds is closed",
        lease_id=f.lease_id,
        group_id=f.group_id,
        reason=f.reason,
        waiting_for=waiting,
        devices=sorted(f.devices),
        **extra,
    )


def check_not_frozen(session: Session, **extra: object) -> None:
    """Raise RevokedError while a freeze holds (lifting what can be lifted first)."""
    f = holding(session)
    if f is not None:
        raise frozen_error(session, f, **extra)


def claim_refusal(session: Session, group_id: int) -> RevokedError | None:
    """What a claim of ``group_id`` on the iommufd path is refused with while a freeze
    holds (lifting what can be lifted first), or None."""
    f = holding(session)
    return None if f is None else frozen_error(session, f, claim_group_id=group_id)
