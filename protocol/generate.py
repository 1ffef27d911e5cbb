"""Regenerate protocol/schema.json and protocol/vectors/*.json from the models.

Run ``python protocol/generate.py`` (with iommud importable, e.g. ``.venv/bin/python``)
after changing a message; ``--check`` exits 1 (and writes nothing) when the checked-in
files differ. A dev tool that writes files: it lives next to what it writes, outside the
runtime package, whose ``iommud.protocol`` core stays sans-I/O.

Version 2 has its own schema (``schema-v2.json``) and vectors (``vectors/v2/``); the v1
files stay exactly as they were. Vectors are lists of ``{name, direction, json, fds}``:
``json`` is the exact datagram text (canonical: compact, keys in schema order), ``fds``
the number of fds that travel with it. ``invalid.json`` adds ``error`` (the code a
server answers with), ``id`` (the id in that error reply, or null) and ``details`` (the
reference server's details);
``v2/invalid.json`` also names the ``version`` of the connection that refuses it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from pydantic import TypeAdapter

from iommud.protocol.codec import decode_request, encode
from iommud.protocol.errors import ErrorCode
from iommud.protocol.exceptions import ProtocolError
from iommud.protocol.limits import DEFAULT_LIMITS, LATEST_VERSION, MAX_FDS, PROTOCOL_VERSION
from iommud.protocol.messages import (
    BindRefused,
    Claim,
    ClaimedDevice,
    ClaimReply,
    DeviceAdded,
    DeviceEntry,
    DeviceRemoved,
    DeviceReset,
    DeviceResetReply,
    DriverBound,
    DriverUnbound,
    ErrorReply,
    EventName,
    GroupEntry,
    Hello,
    HelloReply,
    IoasCreate,
    IoasCreateReply,
    IoasDestroy,
    IoasDestroyReply,
    IoasMap,
    IoasMapReply,
    IoasUnmap,
    IoasUnmapReply,
    IovaRange,
    IovaRanges,
    IovaRangesReply,
    LeaseInfo,
    LeaseRevoked,
    ListDevices,
    ListDevicesReply,
    ListGroups,
    ListGroupsReply,
    MappedRange,
    MapRange,
    Message,
    Offender,
    Owner,
    Ping,
    PingReply,
    Release,
    ReleaseReply,
    Request,
    Revoke,
    RevokeReply,
    ServerMessage,
    Status,
    StatusReply,
    Subscribe,
    SubscribeReply,
    ViabilityChanged,
)
from iommud.protocol.v2 import (
    V2_ONLY_EVENTS,
    ClaimMode,
    ClaimReplyV2,
    ClaimV2,
    EnforceOutcome,
    Holder,
    LeaseEnforced,
    LeaseInfoV2,
    LeaseRevokedV2,
    LeaseStatus,
    PendingRestore,
    RequestV2,
    ServerMessageV2,
    StatusReplyV2,
    StatusV2,
)

ROOT: Final = Path(__file__).resolve().parent
V2_ONLY_CODES: Final = frozenset({ErrorCode.NOT_DELEGABLE})
TO_SERVER: Final = "client_to_server"
TO_CLIENT: Final = "server_to_client"

NIC = "0000:00:03.0"
EDU = "0000:00:10.0"
EDU2 = "0000:00:11.0"
TS = 1735689600.25


def schema(version: int = PROTOCOL_VERSION) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of every datagram, with Request and ServerMessage."""
    defs: dict[str, Any] = {}
    roots: dict[str, Any] = {}
    request: TypeAdapter[Any] = TypeAdapter(Request if version == 1 else RequestV2)
    server: TypeAdapter[Any] = TypeAdapter(ServerMessage if version == 1 else ServerMessageV2)
    adapters: list[tuple[str, TypeAdapter[Any]]] = [("Request", request), ("ServerMessage", server)]
    for name, adapter in adapters:
        sub = adapter.json_schema(ref_template="#/$defs/{model}")
        for key, value in sub.pop("$defs", {}).items():
            if key in defs and defs[key] != value:  # pragma: no cover - model name clash
                raise RuntimeError(f"schema definition {key} differs between unions")
            defs[key] = value
        roots[name] = sub
    defs.update(roots)
    if version == 1:
        # v2's codes never reach a v1 connection; v1's schema lists v1's codes only
        codes = defs["ErrorCode"]["enum"]
        defs["ErrorCode"]["enum"] = [c for c in codes if c not in V2_ONLY_CODES]
        names = defs["EventName"]["enum"]  # ...and v1's events (subscribe's filter)
        defs["EventName"]["enum"] = [n for n in names if n not in V2_ONLY_EVENTS]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"iommud-protocol-v{version}.schema.json",
        "title": f"iommud wire protocol, version {version}",
        "description": (
            "One JSON object per SOCK_SEQPACKET datagram; see PROTOCOL.md. "
            "Request: client to server. ServerMessage: replies, errors, events."
        ),
        "anyOf": [{"$ref": "#/$defs/Request"}, {"$ref": "#/$defs/ServerMessage"}],
        "$defs": dict(sorted(defs.items())),
    }


def _vector(name: str, direction: str, msg: Message) -> dict[str, Any]:
    data, nfds = encode(msg)
    return {"name": name, "direction": direction, "json": data.decode(), "fds": nfds}


def requests() -> list[dict[str, Any]]:
    msgs: list[tuple[str, Message]] = [
        ("hello", Hello(id=1, version=PROTOCOL_VERSION, client="cloud-hypervisor/41.0")),
        ("ping", Ping(id=2)),
        ("status", Status(id=3)),
        ("list_devices", ListDevices(id=4)),
        ("list_groups", ListGroups(id=5)),
        ("claim_auto_new_ioas", Claim(id=6, devices=(EDU,))),
        ("claim_two_devices_into_ioas", Claim(id=7, devices=(EDU, EDU2), ioas_id=3)),
        ("claim_legacy", Claim(id=8, devices=(EDU,), backend="legacy")),
        ("release", Release(id=9, lease_id=1)),
        ("ioas_create", IoasCreate(id=10)),
        ("ioas_destroy", IoasDestroy(id=11, ioas_id=3)),
        (
            "ioas_map_one_fd_fixed_iova",
            IoasMap(
                id=12,
                ioas_id=3,
                ranges=(MapRange(fd_index=0, offset=0, length=0x200000, iova=0x100000000),),
            ),
        ),
        (
            "ioas_map_two_fds_kernel_iova_readonly",
            IoasMap(
                id=13,
                ioas_id=3,
                ranges=(
                    MapRange(fd_index=1, offset=0x1000, length=0x1000, write=False),
                    MapRange(fd_index=0, offset=0, length=0x10000),
                    MapRange(fd_index=1, offset=0x10000, length=0x2000, iova=0x80000000),
                ),
            ),
        ),
        ("ioas_unmap", IoasUnmap(id=14, ioas_id=3, iova=0x100000000, length=0x200000)),
        ("iova_ranges", IovaRanges(id=15, ioas_id=3)),
        ("device_reset", DeviceReset(id=16, bdf=EDU)),
        ("subscribe_all", Subscribe(id=17)),
        (
            "subscribe_filtered",
            Subscribe(
                id=18,
                events=(EventName.VIABILITY_CHANGED, EventName.LEASE_REVOKED),
                groups=(4, 7),
            ),
        ),
        ("revoke", Revoke(id=19, group_id=4, reason="maintenance")),
        ("max_id", Ping(id=2**32 - 1)),
        ("list_devices_page", ListDevices(id=20, offset=312, limit=100)),
        ("list_groups_page", ListGroups(id=21, offset=1)),
    ]
    return [_vector(name, TO_SERVER, msg) for name, msg in msgs]


def replies() -> list[dict[str, Any]]:
    lease = LeaseInfo(
        lease_id=1, group_id=4, uid=1000, pid=4242, backend="iommufd", devices=(EDU,), ioas_id=3
    )
    msgs: list[tuple[str, Message]] = [
        (
            "hello_reply",
            HelloReply(
                id=1,
                version=PROTOCOL_VERSION,
                server="iommud/0.1.0",
                capabilities=("iommufd", "legacy"),
                limits=DEFAULT_LIMITS,
            ),
        ),
        ("ping_reply", PingReply(id=2)),
        (
            "status_reply",
            StatusReply(
                id=3,
                version="0.1.0",
                event_source="udev",
                clients=2,
                leases=(lease,),
                uptime_s=3600.5,
            ),
        ),
        (
            "list_devices_reply",
            ListDevicesReply(
                id=4,
                total=2,
                next_offset=None,
                devices=(
                    DeviceEntry(
                        bdf=NIC,
                        vendor=0x8086,
                        device=0x10D3,
                        class_code=0x020000,
                        driver="e1000e",
                        driver_override=None,
                        group_id=2,
                        is_bridge=False,
                        vfio_cdev=None,
                    ),
                    DeviceEntry(
                        bdf=EDU,
                        vendor=0x1234,
                        device=0x11E8,
                        class_code=0x00FF00,
                        driver="vfio-pci",
                        driver_override="vfio-pci",
                        group_id=4,
                        is_bridge=False,
                        vfio_cdev="/dev/vfio/devices/vfio0",
                    ),
                ),
            ),
        ),
        (
            "list_groups_reply",
            ListGroupsReply(
                id=5,
                total=2,
                next_offset=None,
                groups=(
                    GroupEntry(
                        group_id=2,
                        devices=(NIC,),
                        is_viable=False,
                        offenders=(Offender(bdf=NIC, driver="e1000e"),),
                        path=None,
                        owner=None,
                    ),
                    GroupEntry(
                        group_id=4,
                        devices=(EDU,),
                        is_viable=True,
                        offenders=(),
                        path="iommufd",
                        owner=Owner(uid=1000, pid=4242),
                    ),
                ),
            ),
        ),
        (
            "claim_reply_iommufd",
            ClaimReply(
                id=6,
                lease_id=1,
                group_id=4,
                backend="iommufd",
                ioas_id=3,
                devices=(ClaimedDevice(bdf=EDU, fd_index=0, devid=1),),
            ),
        ),
        (
            "claim_reply_two_devices",
            ClaimReply(
                id=7,
                lease_id=2,
                group_id=5,
                backend="iommufd",
                ioas_id=3,
                devices=(
                    ClaimedDevice(bdf=EDU, fd_index=0, devid=2),
                    ClaimedDevice(bdf=EDU2, fd_index=1, devid=3),
                ),
            ),
        ),
        (
            "claim_reply_legacy",
            ClaimReply(
                id=8,
                lease_id=3,
                group_id=4,
                backend="legacy",
                ioas_id=5,
                devices=(ClaimedDevice(bdf=EDU, fd_index=0, devid=None),),
            ),
        ),
        (
            "list_devices_reply_page",
            ListDevicesReply(
                id=20,
                total=3000,
                next_offset=314,
                devices=(
                    DeviceEntry(
                        bdf="0000:02:07.0",
                        vendor=0x8086,
                        device=0x10CA,
                        class_code=0x020000,
                        driver="vfio-pci",
                        driver_override=None,
                        group_id=312,
                        is_bridge=False,
                        vfio_cdev="/dev/vfio/devices/vfio44",
                    ),
                    DeviceEntry(
                        bdf="0000:02:07.1",
                        vendor=0x8086,
                        device=0x10CA,
                        class_code=0x020000,
                        driver=None,
                        driver_override=None,
                        group_id=313,
                        is_bridge=False,
                        vfio_cdev=None,
                    ),
                ),
            ),
        ),
        (
            "list_groups_reply_last_page",
            ListGroupsReply(
                id=21,
                total=2,
                next_offset=None,
                groups=(
                    GroupEntry(
                        group_id=4,
                        devices=(EDU,),
                        is_viable=True,
                        offenders=(),
                        path="iommufd",
                        owner=None,
                    ),
                ),
            ),
        ),
        (
            "list_groups_reply_holder_hidden",
            ListGroupsReply(
                id=22,
                total=1,
                next_offset=None,
                groups=(
                    GroupEntry(
                        group_id=4,
                        devices=(EDU,),
                        is_viable=True,
                        offenders=(),
                        path="iommufd",
                        owner=Owner(uid=None, pid=None),  # another uid's (PROTOCOL.md 9)
                    ),
                ),
            ),
        ),
        ("release_reply", ReleaseReply(id=9)),
        ("ioas_create_reply", IoasCreateReply(id=10, ioas_id=3)),
        ("ioas_destroy_reply", IoasDestroyReply(id=11)),
        (
            "ioas_map_reply",
            IoasMapReply(id=12, mappings=(MappedRange(iova=0x100000000, length=0x200000),)),
        ),
        ("ioas_unmap_reply", IoasUnmapReply(id=14, unmapped=0x200000)),
        (
            "iova_ranges_reply",
            IovaRangesReply(
                id=15,
                ranges=(
                    IovaRange(start=0, last=0xFEDFFFFF),
                    IovaRange(start=0xFEF00000, last=0xFFFFFFFFFFFFFFFF),
                ),
                alignment=4096,
            ),
        ),
        ("device_reset_reply", DeviceResetReply(id=16)),
        ("subscribe_reply", SubscribeReply(id=17)),
        ("revoke_reply", RevokeReply(id=19, revoked_leases=(1, 3))),
    ]
    return [_vector(name, TO_CLIENT, msg) for name, msg in msgs]


def events() -> list[dict[str, Any]]:
    msgs: list[tuple[str, Message]] = [
        ("driver_bound", DriverBound(ts=TS, seq=1, bdf=EDU, driver="vfio-pci", group_id=4)),
        ("driver_unbound", DriverUnbound(ts=TS, seq=2, bdf=EDU, driver="edu", group_id=4)),
        ("driver_unbound_none", DriverUnbound(ts=TS, seq=3, bdf=EDU, driver=None, group_id=4)),
        ("device_added", DeviceAdded(ts=TS, seq=4, bdf=EDU2, group_id=5)),
        ("device_removed", DeviceRemoved(ts=TS, seq=5, bdf=EDU2, group_id=5)),
        (
            "viability_changed",
            ViabilityChanged(
                ts=TS,
                seq=6,
                group_id=4,
                is_viable=False,
                offenders=(Offender(bdf=EDU, driver="edu"),),
            ),
        ),
        (
            "lease_revoked",
            LeaseRevoked(ts=TS, seq=7, lease_id=1, group_id=4, reason="viability lost"),
        ),
        (
            "bind_refused",
            BindRefused(
                ts=TS,
                seq=8,
                bdf=EDU,
                driver="edu",
                group_id=4,
                reason="group is owned by a client",
            ),
        ),
    ]
    return [_vector(name, TO_CLIENT, msg) for name, msg in msgs]


def errors() -> list[dict[str, Any]]:
    msgs: list[tuple[str, Message]] = [
        (
            "error_bad_request_no_id",
            ErrorReply(id=None, code=ErrorCode.BAD_REQUEST, message="datagram is not valid JSON"),
        ),
        (
            "error_unsupported_version",
            ErrorReply(
                id=1,
                code=ErrorCode.UNSUPPORTED_VERSION,
                message="protocol version not supported",
                details={"version": 2, "supported": [1]},
            ),
        ),
        (
            "error_busy",
            ErrorReply(
                id=6,
                code=ErrorCode.BUSY,
                message="IOMMU group 4 is owned by uid 1001 (pid 777)",
                details={"reason": "held", "group_id": 4, "uid": 1001, "pid": 777, "lease_id": 2},
            ),
        ),
        (
            "error_busy_holder_hidden",
            ErrorReply(
                id=6,
                code=ErrorCode.BUSY,
                message="IOMMU group 4 is held by another client",
                details={"reason": "held", "group_id": 4},
            ),
        ),
        (
            "error_busy_restoring",
            ErrorReply(
                id=6,
                code=ErrorCode.BUSY,
                message="IOMMU group 4 is being given back to its host drivers",
                details={
                    "reason": "restoring",
                    "group_id": 4,
                    "restoring": {
                        NIC: "unbind from vfio-pci: waits until every holder of the device "
                        "fd closes it"
                    },
                },
            ),
        ),
        (
            "error_busy_already_claimed",
            ErrorReply(
                id=6,
                code=ErrorCode.BUSY,
                message=f"{EDU} is already claimed",
                details={"reason": "already_claimed", "bdf": EDU, "group_id": 4, "ioas_id": 3},
            ),
        ),
        (
            "error_not_viable",
            ErrorReply(
                id=6,
                code=ErrorCode.NOT_VIABLE,
                message="group 2 has a device on a DMA-unsafe driver",
                details={"group_id": 2, "offenders": [{"bdf": NIC, "driver": "e1000e"}]},
            ),
        ),
        (
            "error_group_split",
            ErrorReply(
                id=7,
                code=ErrorCode.GROUP_SPLIT,
                message=(
                    "devices of IOMMU group 5 cannot be in different IOASes: "
                    f"{EDU2} into IOAS 3 but {EDU} in IOAS 6"
                ),
                details={
                    "group_id": 5,
                    "reason": "different_ioas",
                    "requested": {"devices": [EDU2], "ioas_id": 3},
                    "claimed": [{"bdf": EDU, "ioas_id": 6}],
                },
            ),
        ),
        (
            "error_kernel",
            ErrorReply(
                id=12,
                code=ErrorCode.KERNEL_ERROR,
                message="IOMMU_IOAS_MAP failed: ENOMEM",
                details={"op": "ioas_map", "errno": 12, "errno_name": "ENOMEM"},
            ),
        ),
        (
            "error_limit_reached",
            ErrorReply(
                id=40,
                code=ErrorCode.LIMIT_REACHED,
                message="too many requests in flight",
                details={"max_inflight": 32},
            ),
        ),
        (
            "error_too_many_fds",
            ErrorReply(
                id=3,
                code=ErrorCode.LIMIT_REACHED,
                message="too many fds attached",
                details={"received": MAX_FDS + 1, "max_fds": MAX_FDS},
            ),
        ),
        (
            "error_datagram_too_big",
            ErrorReply(
                id=None,
                code=ErrorCode.LIMIT_REACHED,
                message="datagram exceeds the size limit",
                details={"size": 70000, "max_datagram": DEFAULT_LIMITS.max_datagram},
            ),
        ),
        (
            "error_fd_not_sealed",
            ErrorReply(
                id=12,
                code=ErrorCode.BAD_REQUEST,
                message=(
                    "range 0: fd 0 is not sealed against shrinking "
                    "(memfd_create with MFD_ALLOW_SEALING, then F_ADD_SEALS F_SEAL_SHRINK)"
                ),
                details={
                    "range": 0,
                    "fd_index": 0,
                    "reason": "not_sealed",
                    "seals": 0,
                    "required": "F_SEAL_SHRINK",
                },
            ),
        ),
    ]
    return [_vector(name, TO_CLIENT, msg) for name, msg in msgs]


def _bad(
    name: str,
    text: str,
    fds: int,
    error: ErrorCode,
    request_id: int | None,
    *,
    version: int = PROTOCOL_VERSION,
) -> dict[str, Any]:
    """An invalid vector; its ``details`` are the reference decoder's, checked to refuse
    it with ``error`` and ``request_id`` (a test sends each through the real daemon)."""
    try:
        decode_request(text.encode(), fds, version)
    except ProtocolError as exc:
        if (exc.code, exc.request_id) != (error, request_id):
            raise RuntimeError(f"{name}: refused as {exc.code} id {exc.request_id}") from exc
        details = exc.details
    else:
        raise RuntimeError(f"{name}: the reference decoder accepts it")
    return {
        "name": name,
        "direction": TO_SERVER,
        "json": text,
        "fds": fds,
        "error": str(error),
        "id": request_id,
        "details": details,
    }


def invalid() -> list[dict[str, Any]]:
    """Datagrams a server must refuse, with the code and id of the error it sends."""
    bad, unknown, limit = ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_OP, ErrorCode.LIMIT_REACHED
    claim = '{"op":"claim","fds":0,"id":5,"devices":["%s"]}'
    return [
        _bad("not_json", "hello", 0, bad, None),
        _bad("not_an_object", "[1,2]", 0, bad, None),
        _bad("duplicate_key", '{"op":"ping","fds":0,"id":1,"id":2}', 0, bad, None),
        _bad("nan", '{"op":"revoke","fds":0,"id":3,"group_id":NaN,"reason":"x"}', 0, bad, None),
        _bad("missing_op", '{"fds":0,"id":3}', 0, bad, 3),
        _bad("unknown_op", '{"op":"frobnicate","fds":0,"id":3}', 0, unknown, 3),
        _bad("reply_op_as_request", '{"op":"ping_reply","fds":0,"id":3}', 0, unknown, 3),
        _bad("missing_fds", '{"op":"ping","id":3}', 0, bad, 3),
        _bad("fds_mismatch", '{"op":"ping","fds":0,"id":3}', 1, bad, 3),
        _bad("too_many_fds", '{"op":"ping","fds":17,"id":3}', MAX_FDS + 1, limit, 3),
        _bad("id_as_string", '{"op":"ping","fds":0,"id":"3"}', 0, bad, None),
        _bad("id_too_big", '{"op":"ping","fds":0,"id":4294967296}', 0, bad, None),
        _bad("id_negative", '{"op":"ping","fds":0,"id":-1}', 0, bad, None),
        _bad("unknown_field", '{"op":"ping","fds":0,"id":3,"x":1}', 0, bad, 3),
        _bad("bdf_uppercase", claim % "0000:00:1F.0", 0, bad, 5),
        _bad("bdf_short", claim % "00:1f.0", 0, bad, 5),
        _bad("bdf_bad_function", claim % "0000:00:1f.8", 0, bad, 5),
        _bad("claim_no_devices", '{"op":"claim","fds":0,"id":5,"devices":[]}', 0, bad, 5),
        _bad(
            "claim_duplicate_devices",
            '{"op":"claim","fds":0,"id":5,"devices":["%s","%s"]}' % (EDU, EDU),  # noqa: UP031
            0,
            bad,
            5,
        ),
        _bad(
            "claim_bad_backend",
            '{"op":"claim","fds":0,"id":5,"devices":["%s"],"backend":"vfio"}' % EDU,  # noqa: UP031
            0,
            bad,
            5,
        ),
        _bad(
            "ioas_map_fd_index_out_of_range",
            '{"op":"ioas_map","fds":1,"id":6,"ioas_id":3,'
            '"ranges":[{"fd_index":1,"offset":0,"length":4096}]}',
            1,
            bad,
            6,
        ),
        _bad(
            "ioas_map_unreferenced_fd",
            '{"op":"ioas_map","fds":2,"id":6,"ioas_id":3,'
            '"ranges":[{"fd_index":0,"offset":0,"length":4096}]}',
            2,
            bad,
            6,
        ),
        _bad(
            "ioas_map_without_fds",
            '{"op":"ioas_map","fds":0,"id":6,"ioas_id":3,'
            '"ranges":[{"fd_index":0,"offset":0,"length":4096}]}',
            0,
            bad,
            6,
        ),
        _bad(
            "ioas_map_zero_length",
            '{"op":"ioas_map","fds":1,"id":6,"ioas_id":3,'
            '"ranges":[{"fd_index":0,"offset":0,"length":0}]}',
            1,
            bad,
            6,
        ),
        _bad(
            "ioas_map_offset_over_u64",
            '{"op":"ioas_map","fds":1,"id":6,"ioas_id":3,'
            '"ranges":[{"fd_index":0,"offset":18446744073709551616,"length":1}]}',
            1,
            bad,
            6,
        ),
        _bad(
            "ioas_map_read_as_int",
            '{"op":"ioas_map","fds":1,"id":6,"ioas_id":3,'
            '"ranges":[{"fd_index":0,"offset":0,"length":4096,"read":1}]}',
            1,
            bad,
            6,
        ),
        _bad("ping_with_fds", '{"op":"ping","fds":1,"id":3}', 1, bad, 3),
        _bad(
            "list_devices_limit_zero", '{"op":"list_devices","fds":0,"id":4,"limit":0}', 0, bad, 4
        ),
        _bad(
            "list_devices_offset_negative",
            '{"op":"list_devices","fds":0,"id":4,"offset":-1}',
            0,
            bad,
            4,
        ),
        _bad(
            "list_groups_offset_as_string",
            '{"op":"list_groups","fds":0,"id":5,"offset":"2"}',
            0,
            bad,
            5,
        ),
    ]


def requests_v2() -> list[dict[str, Any]]:
    delegated = ClaimMode.DELEGATED
    msgs: list[tuple[str, Message]] = [
        ("hello_v2", Hello(id=1, version=LATEST_VERSION, client="iommuctl-vm/0.1.0")),
        ("claim_delegated_new_iommufd", ClaimV2(id=2, devices=(EDU,), mode=delegated)),
        (
            "claim_delegated_join_iommufd",
            ClaimV2(id=3, devices=(EDU, EDU2), mode=delegated, iommufd_id=1),
        ),
        ("claim_brokered_v2", ClaimV2(id=4, devices=(EDU,), ioas_id=3)),
        ("status_v2", StatusV2(id=5)),
        (
            "subscribe_enforcement",
            Subscribe(
                id=6, events=(EventName.LEASE_REVOKED, EventName.LEASE_ENFORCED), groups=None
            ),
        ),
    ]
    return [_vector(name, TO_SERVER, msg) for name, msg in msgs]


def replies_v2() -> list[dict[str, Any]]:
    delegated = ClaimMode.DELEGATED
    msgs: list[tuple[str, Message]] = [
        (
            "hello_reply_v2",
            HelloReply(
                id=1,
                version=LATEST_VERSION,
                server="iommud/0.1.0",
                capabilities=("iommufd", "legacy", "delegate"),
                limits=DEFAULT_LIMITS,
            ),
        ),
        (
            "claim_reply_delegated_new_iommufd",
            ClaimReplyV2(
                id=2,
                lease_id=1,
                group_id=4,
                backend="iommufd",
                ioas_id=None,
                mode=delegated,
                iommufd_id=1,
                iommufd_fd_index=0,
                devices=(ClaimedDevice(bdf=EDU, fd_index=1, devid=None),),
            ),
        ),
        (
            "claim_reply_delegated_join_iommufd",
            ClaimReplyV2(
                id=3,
                lease_id=2,
                group_id=5,
                backend="iommufd",
                ioas_id=None,
                mode=delegated,
                iommufd_id=1,
                iommufd_fd_index=None,
                devices=(
                    ClaimedDevice(bdf=EDU, fd_index=0, devid=None),
                    ClaimedDevice(bdf=EDU2, fd_index=1, devid=None),
                ),
            ),
        ),
        (
            "status_reply_v2",
            StatusReplyV2(
                id=5,
                version="0.1.0",
                event_source="udev",
                clients=2,
                leases=(
                    LeaseInfoV2(
                        lease_id=1,
                        group_id=4,
                        uid=1000,
                        pid=4242,
                        backend="iommufd",
                        devices=(EDU,),
                        ioas_id=0,
                        mode=ClaimMode.DELEGATED,
                        state=LeaseStatus.REVOKED,
                        iommufd_id=1,
                        enforce_at=TS + 10.0,
                        pinned_bytes=67371008,
                        pinned_pids=(4243,),
                    ),
                    LeaseInfoV2(
                        lease_id=3,
                        group_id=5,
                        uid=1000,
                        pid=4300,
                        backend="iommufd",
                        devices=(EDU2,),
                        ioas_id=3,
                        mode=ClaimMode.BROKERED,
                        state=LeaseStatus.ACTIVE,
                        iommufd_id=None,
                        enforce_at=None,
                        pinned_bytes=None,
                        pinned_pids=(),
                    ),
                ),
                restores=(
                    PendingRestore(
                        bdf=NIC,
                        waiting_for="bind to e1000e: group 6 is still in use (a client holds"
                        " a device fd); retrying until it is closed",
                    ),
                ),
                uptime_s=3600.5,
            ),
        ),
        (
            "claim_reply_brokered_v2",
            ClaimReplyV2(
                id=4,
                lease_id=3,
                group_id=4,
                backend="iommufd",
                ioas_id=3,
                mode=ClaimMode.BROKERED,
                iommufd_id=None,
                iommufd_fd_index=None,
                devices=(ClaimedDevice(bdf=EDU, fd_index=0, devid=1),),
            ),
        ),
    ]
    return [_vector(name, TO_CLIENT, msg) for name, msg in msgs]


def errors_v2() -> list[dict[str, Any]]:
    msgs: list[tuple[str, Message]] = [
        (
            "error_not_delegable_legacy_only",
            ErrorReply(
                id=2,
                code=ErrorCode.NOT_DELEGABLE,
                message="group 5 can only go the legacy way; QEMU takes no legacy fd",
                details={"reason": "legacy_only", "group_id": 5},
            ),
        ),
        (
            "error_delegate_not_allowed",
            ErrorReply(
                id=2,
                code=ErrorCode.PERMISSION_DENIED,
                message=(
                    "claim of 0000:00:10.0 denied: "
                    "access[0] (uid 1000: *) does not grant delegate = true"
                ),
                details={
                    "bdf": EDU,
                    "uid": 1000,
                    "gid": 1000,
                    "rule": 0,
                    "reason": "delegate_not_allowed",
                },
            ),
        ),
        (
            "error_device_reset_delegated",
            ErrorReply(
                id=5,
                code=ErrorCode.INVALID_STATE,
                message="0000:00:10.0 is delegated: its VMM resets it",
                details={"reason": "delegated", "bdf": EDU, "lease_id": 1},
            ),
        ),
    ]
    return [_vector(name, TO_CLIENT, msg) for name, msg in msgs]


def events_v2() -> list[dict[str, Any]]:
    """v2's lease_revoked (with grace_s) and lease_enforced; the other events are v1's."""
    msgs: list[tuple[str, Message]] = [
        (
            "lease_revoked_delegated",
            LeaseRevokedV2(
                ts=TS,
                seq=7,
                lease_id=1,
                group_id=4,
                reason="maintenance",
                mode=ClaimMode.DELEGATED,
                grace_s=10.0,
            ),
        ),
        (
            "lease_revoked_brokered",
            LeaseRevokedV2(
                ts=TS,
                seq=8,
                lease_id=3,
                group_id=5,
                reason="viability lost",
                mode=ClaimMode.BROKERED,
                grace_s=None,
            ),
        ),
        (
            "lease_enforced_returned",
            LeaseEnforced(
                ts=TS + 10.5,
                seq=9,
                lease_id=1,
                group_id=4,
                outcome=EnforceOutcome.RETURNED,
                killed=(Holder(pid=4243, uid=1000, comm="qemu-system-x86"),),
            ),
        ),
        (
            "lease_enforced_stuck",
            LeaseEnforced(
                ts=TS + 40.0,
                seq=10,
                lease_id=1,
                group_id=4,
                outcome=EnforceOutcome.STUCK,
                killed=(),
            ),
        ),
    ]
    return [_vector(name, TO_CLIENT, msg) for name, msg in msgs]


def invalid_v2() -> list[dict[str, Any]]:
    """Claims a v2 server refuses (and v2 keys a v1 connection refuses as unknown)."""
    bad = ErrorCode.BAD_REQUEST
    claim = '{"op":"claim","fds":0,"id":5,"devices":["%s"],%s}'
    cases = [
        (1, "v1_claim_with_mode", claim % (EDU, '"mode":"delegated"')),
        (1, "v1_claim_with_iommufd_id", claim % (EDU, '"iommufd_id":null')),
        (2, "delegated_with_ioas_id", claim % (EDU, '"ioas_id":3,"mode":"delegated"')),
        (2, "delegated_legacy", claim % (EDU, '"backend":"legacy","mode":"delegated"')),
        (2, "brokered_with_iommufd_id", claim % (EDU, '"mode":"brokered","iommufd_id":1')),
        (2, "unknown_mode", claim % (EDU, '"mode":"shared"')),
    ]
    out = [{**_bad(name, text, 0, bad, 5, version=v), "version": v} for v, name, text in cases]
    v1_subscribe = '{"op":"subscribe","fds":0,"id":6,"events":["lease_enforced"],"groups":null}'
    out.append(
        {**_bad("v1_subscribe_lease_enforced", v1_subscribe, 0, bad, 6, version=1), "version": 1}
    )
    return out


def outputs() -> dict[str, str]:
    """File path (relative to protocol/) -> exact content."""

    def dump(value: Any) -> str:
        return json.dumps(value, indent=2, ensure_ascii=False) + "\n"

    return {
        "schema.json": dump(schema()),
        "vectors/requests.json": dump(requests()),
        "vectors/replies.json": dump(replies()),
        "vectors/events.json": dump(events()),
        "vectors/errors.json": dump(errors()),
        "vectors/invalid.json": dump(invalid()),
        "schema-v2.json": dump(schema(LATEST_VERSION)),
        "vectors/v2/requests.json": dump(requests_v2()),
        "vectors/v2/replies.json": dump(replies_v2()),
        "vectors/v2/errors.json": dump(errors_v2()),
        "vectors/v2/events.json": dump(events_v2()),
        "vectors/v2/invalid.json": dump(invalid_v2()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python protocol/generate.py", description=__doc__)
    parser.add_argument("--root", type=Path, default=ROOT, help="the protocol/ directory")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on drift")
    args = parser.parse_args(argv)
    drift = []
    for rel, content in outputs().items():
        path = args.root / rel
        current = path.read_text() if path.exists() else None
        if current == content:
            continue
        drift.append(rel)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    for rel in drift:
        print(f"{'differs' if args.check else 'wrote'}: {args.root / rel}")
    return 1 if (args.check and drift) else 0


if __name__ == "__main__":
    sys.exit(main())
