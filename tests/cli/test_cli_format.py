"""iommuctl's pure formatters on model instances (no daemon)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from iommud.cli import (
    build_parser,
    format_error,
    format_event,
    format_ls,
    format_status,
    table,
)
from iommud.errors import BusyError, KernelError
from iommud.protocol import messages as m
from iommud.protocol.v2 import (
    ClaimMode,
    EnforceOutcome,
    Holder,
    LeaseEnforced,
    LeaseInfoV2,
    LeaseRevokedV2,
    LeaseStatus,
    PendingRestore,
    StatusReplyV2,
)


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Timestamps print in local time: pin it to UTC for exact comparisons."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


TS = 1795557001.123  # 2026-11-24T21:50:01.123Z


def dev(bdf: str, driver: str | None, gid: int | None, *, bridge: bool = False) -> m.DeviceEntry:
    return m.DeviceEntry(
        bdf=bdf,
        vendor=0x1B36 if bridge else 0x8086,
        device=0x0001 if bridge else 0x100E,
        class_code=0x060400 if bridge else 0x020000,
        driver=driver,
        driver_override=None,
        group_id=gid,
        is_bridge=bridge,
        vfio_cdev=None,
    )


def test_table_aligns_and_never_pads_the_last_column() -> None:
    assert table(("A", "BB", "C"), [["xxx", "y", "z"], ["", "", ""]]).split("\n") == [
        "A    BB  C",
        "xxx  y   z",
        "",
    ]


def test_format_ls_groups_rows_and_shows_group_columns_once() -> None:
    devices = [
        dev("0000:01:03.0", "e1000", 4),
        dev("0000:00:11.0", None, 4, bridge=True),
        dev("0000:00:10.0", "vfio-pci", 3),
        dev("0000:00:1e.0", None, None),
    ]
    groups = [
        m.GroupEntry(
            group_id=4,
            devices=("0000:00:11.0", "0000:01:03.0"),
            is_viable=False,
            offenders=(m.Offender(bdf="0000:01:03.0", driver="e1000"),),
            path=m.BackendKind.LEGACY,
            owner=None,
        ),
        m.GroupEntry(
            group_id=3,
            devices=("0000:00:10.0",),
            is_viable=True,
            offenders=(),
            path=m.BackendKind.IOMMUFD,
            owner=m.Owner(uid=1000, pid=4242),
        ),
    ]
    assert format_ls(devices, groups).splitlines() == [
        "BDF           ID         DRIVER      GROUP  VIABLE  OFFENDERS           PATH     OWNER",
        "0000:00:10.0  8086:100e  vfio-pci    3      yes     -                   iommufd  "
        "uid 1000 pid 4242",
        "0000:00:11.0  1b36:0001  - (bridge)  4      no      0000:01:03.0=e1000  legacy   -",
        "0000:01:03.0  8086:100e  e1000",
        "0000:00:1e.0  8086:100e  -           -      -       -                   -        -",
    ]


def test_format_ls_shows_a_hidden_owner_as_held() -> None:
    """Another uid's hold comes as owner {null, null}: the row says held, not "uid None"."""
    group = m.GroupEntry.model_validate(
        {
            "group_id": 3,
            "devices": ["0000:00:10.0"],
            "is_viable": True,
            "offenders": [],
            "path": "iommufd",
            "owner": {"uid": None, "pid": None},
        }
    )
    (_, row) = format_ls([dev("0000:00:10.0", "vfio-pci", 3)], [group]).splitlines()
    assert row.split()[-2:] == ["iommufd", "held"]


def ev(cls: type[m.Event], **kw: object) -> m.Event:
    return cls(ts=TS, seq=1, **kw)


EVENT_CASES: list[tuple[m.Event, str]] = [
    (
        ev(m.DriverBound, bdf="0000:01:03.0", driver="e1000", group_id=7),
        "2026-11-24T21:50:01.123 driver_bound 0000:01:03.0 e1000 group 7",
    ),
    (
        ev(m.DriverUnbound, bdf="0000:01:03.0", driver=None, group_id=None),
        "2026-11-24T21:50:01.123 driver_unbound 0000:01:03.0 - group -",
    ),
    (
        ev(m.DeviceAdded, bdf="0000:01:04.0", group_id=4),
        "2026-11-24T21:50:01.123 device_added 0000:01:04.0 group 4",
    ),
    (
        ev(m.DeviceRemoved, bdf="0000:01:04.0", group_id=4),
        "2026-11-24T21:50:01.123 device_removed 0000:01:04.0 group 4",
    ),
    (
        ev(m.ViabilityChanged, group_id=4, is_viable=True, offenders=()),
        "2026-11-24T21:50:01.123 viability_changed group 4 viable",
    ),
    (
        ev(
            m.ViabilityChanged,
            group_id=4,
            is_viable=False,
            offenders=(
                m.Offender(bdf="0000:01:03.0", driver="e1000"),
                m.Offender(bdf="0000:01:04.0", driver="e1000e"),
            ),
        ),
        "2026-11-24T21:50:01.123 viability_changed group 4 not viable: "
        "0000:01:03.0=e1000,0000:01:04.0=e1000e",
    ),
    (
        ev(m.LeaseRevoked, lease_id=3, group_id=4, reason="viability lost"),
        "2026-11-24T21:50:01.123 lease_revoked lease 3 group 4: viability lost",
    ),
    (
        ev(
            LeaseRevokedV2,
            lease_id=3,
            group_id=4,
            reason="maintenance",
            mode=ClaimMode.DELEGATED,
            grace_s=10.0,
        ),
        "2026-11-24T21:50:01.123 lease_revoked lease 3 group 4: maintenance (grace 10 s)",
    ),
    (
        ev(
            LeaseEnforced,
            lease_id=3,
            group_id=4,
            outcome=EnforceOutcome.RETURNED,
            killed=(Holder(pid=812, uid=1000, comm="qemu-system-x86"),),
        ),
        "2026-11-24T21:50:01.123 lease_enforced lease 3 group 4: returned killed "
        "812(qemu-system-x86)",
    ),
    (
        ev(m.BindRefused, bdf="0000:01:03.0", driver="e1000", group_id=4, reason="EBUSY"),
        "2026-11-24T21:50:01.123 bind_refused 0000:01:03.0 e1000 group 4: EBUSY",
    ),
]


@pytest.mark.parametrize(("event", "line"), EVENT_CASES)
def test_format_event(event: m.Event, line: str) -> None:
    assert format_event(event) == line


def test_every_event_name_has_a_format_case() -> None:
    """A new EventName must get a case in describe_event and a line above."""
    assert {e.event for e, _ in EVENT_CASES} == set(m.EventName)


def test_format_status_with_leases() -> None:
    st = m.StatusReply(
        id=1,
        version="0.1.0",
        event_source="kernel",
        clients=2,
        leases=(
            m.LeaseInfo(
                lease_id=5,
                group_id=4,
                uid=1000,
                pid=77,
                backend=m.BackendKind.LEGACY,
                devices=("0000:01:01.0", "0000:01:02.0"),
                ioas_id=1,
            ),
        ),
        uptime_s=12.345,
    )
    assert format_status(st).splitlines() == [
        "daemon        iommud 0.1.0",
        "event source  kernel",
        "clients       2",
        "uptime        12.3 s",
        "leases        1",
        "",
        "LEASE  GROUP  UID   PID  BACKEND  IOAS  DEVICES",
        "5      4      1000  77   legacy   1     0000:01:01.0,0000:01:02.0",
    ]


def test_format_status_v2_shows_mode_state_and_pinned_bytes() -> None:
    """A v2 status adds MODE, STATE and the VMM's VmPin (and who pinned it)."""
    common = {"uid": 1000, "pid": 77, "backend": m.BackendKind.IOMMUFD}
    st = StatusReplyV2(
        id=1,
        version="0.1.0",
        event_source="udev",
        clients=1,
        leases=(
            LeaseInfoV2(
                lease_id=5,
                group_id=3,
                devices=("0000:00:10.0",),
                ioas_id=0,
                mode=ClaimMode.DELEGATED,
                state=LeaseStatus.REVOKED,
                iommufd_id=1,
                enforce_at=TS,
                pinned_bytes=65792 * 1024,
                pinned_pids=(812,),
                **common,
            ),
            LeaseInfoV2(
                lease_id=6,
                group_id=4,
                devices=("0000:01:01.0",),
                ioas_id=2,
                mode=ClaimMode.BROKERED,
                state=LeaseStatus.ACTIVE,
                iommufd_id=None,
                enforce_at=None,
                pinned_bytes=None,
                pinned_pids=(),
                **common,
            ),
        ),
        restores=(PendingRestore(bdf="0000:01:03.0", waiting_for="bind to e1000: in use"),),
        uptime_s=1.0,
    )
    out = format_status(st).splitlines()
    assert "restores      1" in out
    assert out[-6:] == [
        "LEASE  GROUP  UID   PID  BACKEND  IOAS  DEVICES       MODE       STATE    PINNED (VmPin)",
        "5      3      1000  77   iommufd  0     0000:00:10.0  delegated  revoked  "
        "65792 KiB by 812",
        "6      4      1000  77   iommufd  2     0000:01:01.0  brokered   active   -",
        "",
        "RESTORING     WAITING FOR",
        "0000:01:03.0  bind to e1000: in use",
    ]


def test_format_error_prints_code_message_and_details() -> None:
    err = BusyError("IOMMU group 4 is owned by uid 1000 (pid 7)", group_id=4, uid=1000, pid=7)
    assert format_error(err).splitlines() == [
        "iommuctl: busy: IOMMU group 4 is owned by uid 1000 (pid 7)",
        "  group_id: 4",
        "  pid: 7",
        "  uid: 1000",
    ]
    kerr = KernelError("ioas_map", 22)
    assert format_error(kerr).splitlines()[0] == (
        "iommuctl: kernel_error: ioas_map failed: EINVAL (Invalid argument)"
    )


def test_parser_defaults_socket_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOMMUD_SOCKET", "/tmp/x.sock")
    assert build_parser().parse_args(["ls"]).socket == "/tmp/x.sock"
    monkeypatch.delenv("IOMMUD_SOCKET")
    args = build_parser().parse_args(["claim", "0000:00:10.0", "--hold", "--backend", "legacy"])
    assert (args.socket, args.devices, args.hold, args.backend) == (
        "/run/iommud/iommud.sock",
        ["0000:00:10.0"],
        True,
        "legacy",
    )
