"""Viability and path selection on the lab topology and a server-shaped host."""

from __future__ import annotations

from pathlib import Path

import pytest
import topology

from iommud.errors import (
    BadRequestError,
    BusyError,
    GroupSplitError,
    NotFoundError,
    NotViableError,
)
from iommud.host.snapshot import HostSnapshot, read_snapshot
from iommud.host.viability import (
    DEFAULT_DMA_SAFE_DRIVERS,
    BackendRequest,
    ClaimIntent,
    ClaimPath,
    ExistingClaim,
    Offender,
    PathDecision,
    Viability,
    group_viability,
    load_dma_safe_driver_table,
    select_path,
    whole_group_path,
)
from iommud.protocol.errors import ErrorCode
from tests.fakesys import FakeSys, lab_topology, real_server

E1 = topology.EDU1
E2 = topology.EDU2
NIC = topology.NIC
BRIDGE = topology.BRIDGE
SOLO = topology.EDU0


def fresh(fs: FakeSys) -> HostSnapshot:
    return read_snapshot(fs.sys_root, fs.dev_root)


@pytest.fixture
def freed(lab: FakeSys) -> HostSnapshot:
    """The lab after e1000 let go of 0000:01:03.0 (group 4 viable)."""
    lab.unbind(NIC)
    return fresh(lab)


def test_default_drivers_are_the_kernels_driver_managed_dma_list() -> None:
    assert (
        frozenset(
            {
                "vfio-pci",
                "mlx5_vfio_pci",
                "hisi_acc_vfio_pci",
                "pds_vfio_pci",
                "virtio_vfio_pci",
                "nvgrace_gpu_vfio_pci",
                "qat_vfio_pci",
                "pci-stub",
                "pcieport",
            }
        )
        == DEFAULT_DMA_SAFE_DRIVERS
    )
    assert all(src.startswith("drivers/") for src in load_dma_safe_driver_table().values())


# ----------------------------------------------------------------- viability


def test_solo_group_viable(lab_snap: HostSnapshot) -> None:
    assert group_viability(lab_snap, 3) == Viability(3, True, ())


def test_e1000_makes_group_not_viable(lab_snap: HostSnapshot) -> None:
    assert group_viability(lab_snap, 4) == Viability(4, False, (Offender(NIC, "e1000"),))


def test_every_offender_named(lab_snap: HostSnapshot) -> None:
    assert group_viability(lab_snap, 5).offenders == (
        Offender("0000:00:1f.0", "lpc_ich"),
        Offender("0000:00:1f.2", "ahci"),
    )


def test_viable_after_unbind(freed: HostSnapshot) -> None:
    assert group_viability(freed, 4) == Viability(4, True, ())


def test_safe_driver_set_is_a_parameter(lab_snap: HostSnapshot, fast_tmp: Path) -> None:
    assert group_viability(lab_snap, 4, DEFAULT_DMA_SAFE_DRIVERS | {"e1000"}).is_viable
    srv = fresh(real_server(fast_tmp / "srv"))
    assert group_viability(srv, 1).is_viable  # root port on pcieport
    assert group_viability(srv, 1, frozenset({"vfio-pci"})).offenders == (
        Offender("0000:00:01.0", "pcieport"),
    )


def test_non_pci_member_with_driver_is_an_offender(lab: FakeSys) -> None:
    lab.add_other_member(3, "ACPI0007:00", driver="processor")
    lab.add_other_member(3, "PNP0C0F:00")
    assert group_viability(fresh(lab), 3).offenders == (Offender("ACPI0007:00", "processor"),)


def test_unknown_group(lab_snap: HostSnapshot) -> None:
    with pytest.raises(NotFoundError) as exc:
        group_viability(lab_snap, 99)
    assert (exc.value.code, exc.value.details) == (ErrorCode.NOT_FOUND, {"group_id": 99})


# ----------------------------------------------------------------- path selection


def claim(*devices: str, client: str = "A", ioas: int | None = None, **kw: object) -> ClaimIntent:
    return ClaimIntent(client, devices, ioas, **kw)  # type: ignore[arg-type]


def test_solo_group_takes_iommufd(lab_snap: HostSnapshot) -> None:
    assert select_path(lab_snap, 3, claim(SOLO), {}) == PathDecision(
        ClaimPath.IOMMUFD, "1:1 group 3 and the host has /dev/iommu"
    )


def test_solo_group_without_dev_iommu_takes_legacy(fast_tmp: Path) -> None:
    snap = fresh(lab_topology(fast_tmp, iommufd=False))
    decision = select_path(snap, 3, claim(SOLO), {})
    assert decision == PathDecision(
        ClaimPath.LEGACY, "the host has no /dev/iommu; the host has /dev/vfio/vfio"
    )


def test_no_backend_at_all(fast_tmp: Path) -> None:
    snap = fresh(lab_topology(fast_tmp, iommufd=False, legacy=False))
    with pytest.raises(BadRequestError) as exc:
        select_path(snap, 3, claim(SOLO), {})
    reason = "the host has no /dev/iommu; the host has no /dev/vfio/vfio (legacy VFIO container)"
    assert exc.value.details == {"group_id": 3, "requested": "auto", "reason": reason}


def test_not_viable_names_offender(lab_snap: HostSnapshot) -> None:
    with pytest.raises(NotViableError) as exc:
        select_path(lab_snap, 4, claim(E1), {})
    assert exc.value.code is ErrorCode.NOT_VIABLE
    assert exc.value.details == {
        "group_id": 4,
        "offenders": [{"bdf": NIC, "driver": "e1000"}],
    }
    assert "0000:01:03.0 (e1000)" in exc.value.message


def test_partial_claim_of_multi_device_group_takes_legacy(freed: HostSnapshot) -> None:
    d = select_path(freed, 4, claim(E1, E2), {})
    assert d.backend is ClaimPath.LEGACY
    assert d.reason.startswith("multi-device group 4: 0000:01:03.0 would stay unclaimed")


def test_whole_group_into_one_ioas_takes_iommufd(freed: HostSnapshot) -> None:
    """Shared IOAS: every DMA-capable device (the bridge excluded) by one client -> iommufd."""
    d = select_path(freed, 4, claim(E1, E2, NIC, ioas=7), {})
    assert d == PathDecision(
        ClaimPath.IOMMUFD,
        "every DMA-capable device of group 4 is claimed by this client into IOAS 7, "
        "and the host has /dev/iommu",
    )


def test_existing_iommufd_claims_count_toward_the_whole_group(freed: HostSnapshot) -> None:
    """A re-claim of a released device into the group's IOAS stays on iommufd."""
    held = {
        E1: ExistingClaim("A", 7, ClaimPath.IOMMUFD),
        E2: ExistingClaim("A", 7, ClaimPath.IOMMUFD),
    }
    d = select_path(freed, 4, claim(NIC, ioas=7), held)
    assert d.backend is ClaimPath.IOMMUFD


def test_existing_legacy_claims_fix_the_backend(freed: HostSnapshot) -> None:
    held = {E1: ExistingClaim("A", 7, ClaimPath.LEGACY)}
    d = select_path(freed, 4, claim(E2, NIC, ioas=7), held)
    assert d.backend is ClaimPath.LEGACY
    assert d.reason.startswith("group 4 is already claimed through legacy")


def test_split_into_another_ioas_refused(freed: HostSnapshot) -> None:
    held = {E1: ExistingClaim("A", 7, ClaimPath.LEGACY)}
    with pytest.raises(GroupSplitError) as exc:
        select_path(freed, 4, claim(E2, ioas=8), held)
    assert exc.value.code is ErrorCode.GROUP_SPLIT
    assert exc.value.details == {
        "group_id": 4,
        "reason": "different_ioas",
        "requested": {"devices": [E2], "ioas_id": 8},
        "claimed": [{"bdf": E1, "ioas_id": 7}],
    }
    assert exc.value.message == (
        "devices of IOMMU group 4 cannot be in different IOASes: "
        "0000:01:02.0 into IOAS 8 but 0000:01:01.0 in IOAS 7"
    )


def test_split_into_new_ioas_refused(freed: HostSnapshot) -> None:
    held = {E1: ExistingClaim("A", 7, ClaimPath.LEGACY)}
    with pytest.raises(GroupSplitError) as exc:
        select_path(freed, 4, claim(E2), held)
    assert exc.value.details["requested"] == {"devices": [E2], "ioas_id": None}
    assert "0000:01:02.0 into a new IOAS but 0000:01:01.0 in IOAS 7" in exc.value.message


def test_split_across_clients_refused(freed: HostSnapshot) -> None:
    held = {E1: ExistingClaim("A", 7, ClaimPath.LEGACY)}
    with pytest.raises(GroupSplitError) as exc:
        select_path(freed, 4, claim(E2, client="B", ioas=7), held)
    assert exc.value.details == {
        "group_id": 4,
        "reason": "different_client",
        "requested": {"devices": [E2], "ioas_id": 7},
        "claimed": [{"bdf": E1, "ioas_id": 7}],
    }


def test_already_claimed_device_is_busy(freed: HostSnapshot) -> None:
    held = {E1: ExistingClaim("A", 7, ClaimPath.LEGACY)}
    with pytest.raises(BusyError) as exc:
        select_path(freed, 4, claim(E1, client="B", ioas=7), held)
    assert exc.value.details == {
        "reason": "already_claimed",
        "bdf": E1,
        "group_id": 4,
        "ioas_id": 7,
    }


def test_explicit_iommufd_impossible_for_partial_group(freed: HostSnapshot) -> None:
    with pytest.raises(BadRequestError) as exc:
        select_path(freed, 4, claim(E1, backend=BackendRequest.IOMMUFD), {})
    why = (
        "multi-device group 4: 0000:01:02.0, 0000:01:03.0 would stay unclaimed "
        "(iommufd needs every DMA-capable device of the group in one IOAS)"
    )
    assert exc.value.details == {"group_id": 4, "requested": "iommufd", "reason": why}
    assert exc.value.message == f"backend iommufd is not possible for group 4: {why}"


def test_explicit_legacy_honoured_for_solo_group(lab_snap: HostSnapshot) -> None:
    d = select_path(lab_snap, 3, claim(SOLO, backend=BackendRequest.LEGACY), {})
    assert d == PathDecision(ClaimPath.LEGACY, "legacy was requested; the host has /dev/vfio/vfio")


def test_explicit_legacy_without_container(fast_tmp: Path) -> None:
    snap = fresh(lab_topology(fast_tmp, legacy=False))
    with pytest.raises(BadRequestError) as exc:
        select_path(snap, 3, claim(SOLO, backend=BackendRequest.LEGACY), {})
    assert exc.value.details["reason"] == "the host has no /dev/vfio/vfio (legacy VFIO container)"


def test_target_ioas_kind_constrains_backend(lab_snap: HostSnapshot) -> None:
    d = select_path(lab_snap, 3, claim(SOLO, ioas=5, ioas_backend=ClaimPath.LEGACY), {})
    assert d.backend is ClaimPath.LEGACY
    with pytest.raises(BadRequestError) as exc:
        select_path(
            lab_snap,
            3,
            claim(SOLO, ioas=5, ioas_backend=ClaimPath.LEGACY, backend=BackendRequest.IOMMUFD),
            {},
        )
    assert exc.value.details["reason"] == "conflicting_backends"


def test_bridge_cannot_be_claimed(freed: HostSnapshot) -> None:
    with pytest.raises(BadRequestError) as exc:
        select_path(freed, 4, claim(BRIDGE), {})
    assert exc.value.details == {"bdf": BRIDGE, "group_id": 4}


def test_device_outside_group(freed: HostSnapshot) -> None:
    with pytest.raises(BadRequestError) as exc:
        select_path(freed, 4, claim(E1, SOLO), {})
    assert exc.value.details == {"group_id": 4, "devices": [SOLO]}


def test_unknown_device_and_empty_claim(freed: HostSnapshot) -> None:
    with pytest.raises(NotFoundError) as exc:
        select_path(freed, 4, claim("0000:07:00.0"), {})
    assert exc.value.details == {"bdf": "0000:07:00.0"}
    with pytest.raises(BadRequestError):
        select_path(freed, 4, claim(), {})


# ----------------------------------------------------------------- whole-group helper


def test_whole_group_path_lab(lab: FakeSys, lab_snap: HostSnapshot) -> None:
    assert whole_group_path(lab_snap, 3) is ClaimPath.IOMMUFD
    assert whole_group_path(lab_snap, 4) is None  # e1000 bound
    lab.unbind(NIC)
    assert whole_group_path(fresh(lab), 4) is ClaimPath.IOMMUFD


def test_whole_group_path_without_dev_iommu(fast_tmp: Path) -> None:
    fs = lab_topology(fast_tmp, iommufd=False)
    assert whole_group_path(fresh(fs), 3) is ClaimPath.LEGACY
    (fs.dev_root / "vfio" / "vfio").unlink()
    assert whole_group_path(fresh(fs), 3) is None


def test_whole_group_path_server(fast_tmp: Path) -> None:
    snap = fresh(real_server(fast_tmp))
    assert whole_group_path(snap, 1) is None  # only a root port: nothing claimable
    assert whole_group_path(snap, 6) is None  # mlx5_core PFs
    assert whole_group_path(snap, 9) is ClaimPath.IOMMUFD  # VF on mlx5_vfio_pci
    assert whole_group_path(snap, 11) is ClaimPath.IOMMUFD  # GPU + audio, both vfio-pci
