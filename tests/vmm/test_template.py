"""The VMM command line of ``iommuctl vm``: placeholders, ids, and every refusal."""

from __future__ import annotations

import json

import pytest

from iommud.vmm.template import (
    TemplateError,
    normalize_bdf,
    option_id,
    parse_template,
    split_keyval,
    with_id,
)

EDU = "0000:00:10.0"
QEMU = ["qemu-system-x86_64", "-m", "1G"]
OBJECT = ["-object", "iommufd,id=i0,fd={iommufd}"]


def test_placeholders_become_fd_numbers() -> None:
    """{iommufd} and {BDF} (short form too) are replaced; everything else is kept."""
    argv = [*QEMU, *OBJECT, "-device", "vfio-pci,id=dev0,iommufd=i0,fd={00:10.0}"]
    t = parse_template(argv, ["00:10.0"])
    assert t.devices == (EDU,)
    assert t.qdev_ids == {EDU: "dev0"}
    assert t.iommufd_object == "i0"
    assert t.render({"iommufd": 7, EDU: 9}, ["-x"]) == [
        *QEMU,
        "-object",
        "iommufd,id=i0,fd=7",
        "-device",
        "vfio-pci,id=dev0,iommufd=i0,fd=9",
        "-x",
    ]


def test_a_device_without_id_gets_one() -> None:
    """device_del needs the id: keyval and JSON options get ``iommuctl-<bdf>``."""
    argv = [*QEMU, *OBJECT, "--device", "vfio-pci,iommufd=i0,fd={0000:00:10.0}"]
    t = parse_template(argv, [EDU])
    assert t.qdev_ids == {EDU: "iommuctl-0000-00-10.0"}
    assert t.argv[-1] == "vfio-pci,iommufd=i0,fd={0000:00:10.0},id=iommuctl-0000-00-10.0"
    js = json.dumps({"driver": "vfio-pci", "iommufd": "i0", "fd": "{0000:00:10.0}"})
    t = parse_template([*QEMU, "-object", '{"qom-type":"iommufd","id":"x","fd":"{iommufd}"}',
                        "-device", js], [EDU])  # fmt: skip
    assert t.iommufd_object == "x"
    rendered = json.loads(t.render({"iommufd": 3, EDU: 4})[-1])
    assert rendered == {"driver": "vfio-pci", "iommufd": "i0", "fd": "4",
                        "id": "iommuctl-0000-00-10.0"}  # fmt: skip


def test_json_braces_are_not_placeholders() -> None:
    """QEMU's JSON option syntax is left alone; only {name} tokens are placeholders."""
    t = parse_template([*QEMU, "-machine", '{"type":"q35"}'], [])
    assert t.render({}) == [*QEMU, "-machine", '{"type":"q35"}']


def test_held_devices_take_no_placeholder() -> None:
    argv = [*QEMU, *OBJECT, "-device", "vfio-pci,id=d,fd={0000:01:01.0}"]
    t = parse_template(argv, ["0000:01:01.0"], ["0000:01:03.0"])
    assert t.held == ("0000:01:03.0",)


def test_keyval_helpers() -> None:
    assert split_keyval("a,b=c,,d,e=f") == ["a", "b=c,d", "e=f"]
    assert option_id("vfio-pci,fd=3,id=x,,y") == "x,y"
    assert option_id("vfio-pci,fd=3") is None
    assert option_id("{not json") is None
    assert with_id("edu", "e") == "edu,id=e"
    assert normalize_bdf("00:1F.7") == "0000:00:1f.7"
    assert normalize_bdf("0000:00:10.8") is None


@pytest.mark.parametrize(
    ("argv", "devices", "held", "message"),
    [
        ([], [EDU], [], "no VMM command"),
        ([*QEMU, *OBJECT, "-device", "vfio-pci,fd={nope}"], [EDU], [], "unknown placeholder"),
        ([*QEMU, *OBJECT, "-device", "x,fd={00:11.0}"], [EDU], [], "not claimed"),
        ([*QEMU, *OBJECT], [EDU], [], "has no placeholder"),
        ([*QEMU, "-device", "vfio-pci,fd={00:10.0}"], [EDU], [], "-object iommufd"),
        ([*QEMU, *OBJECT], [], [], "needs at least one --device"),
        ([*QEMU, *OBJECT, *OBJECT, "-device", "v,fd={00:10.0}"], [EDU], [], "used twice"),
        ([*QEMU, *OBJECT, "-device", "v,fd={00:10.0}", "-device", "w,fd={00:10.0}"], [EDU], [],
         "used twice"),
        ([*QEMU, *OBJECT, "-global", "v.fd={00:10.0}"], [EDU], [], "-device vfio-pci"),
        ([*QEMU, "-device", "iommufd,fd={iommufd}"], [], [], "must be in an -object"),
        ([*QEMU, "-object", "iommufd,fd={iommufd}", "-device", "v,fd={00:10.0}"], [EDU], [],
         "needs an id="),
        ([*QEMU, "-daemonize"], [], [], "not allowed"),
        (QEMU, ["10.0"], [], "not a PCI address"),
        (QEMU, [EDU, "00:10.0"], [], "given twice"),
        (QEMU, [EDU], [EDU], "given twice"),
        ([*QEMU, *OBJECT, "-device", "v,fd={00:10.0}"], [], [EDU], "a --hold device"),
        (QEMU, [], [EDU], "--hold comes with"),
    ],
)  # fmt: skip
def test_bad_command_lines_are_refused_before_any_claim(
    argv: list[str], devices: list[str], held: list[str], message: str
) -> None:
    with pytest.raises(TemplateError, match=message):
        parse_template(argv, devices, held)
