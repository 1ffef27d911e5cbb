"""Config loading: defaults, the shipped example, and errors naming exact key paths."""

from __future__ import annotations

import grp
import pwd
from pathlib import Path

import pytest

from iommud.config import (
    DEFAULT_QUOTA,
    Config,
    Quota,
    format_loc,
    load_config,
    parse_config,
    parse_size,
)
from iommud.errors import ConfigError
from iommud.host.viability import DEFAULT_DMA_SAFE_DRIVERS
from iommud.protocol.errors import ErrorCode

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "iommud.toml"
ROOT_GROUP = grp.getgrgid(0).gr_name


def test_empty_file_is_valid(tmp_path: Path) -> None:
    p = tmp_path / "empty.toml"
    p.write_text("")
    cfg = load_config(p)
    assert cfg == Config()
    assert cfg.daemon.sys_root == Path("/sys")
    assert cfg.daemon.dev_root == Path("/dev")
    assert cfg.daemon.socket == Path("/run/iommud/iommud.sock")
    assert cfg.access == ()
    assert cfg.quotas == {DEFAULT_QUOTA: Quota(pinned_bytes=1 << 30, max_ioas=8, max_mappings=4096)}
    assert cfg.dma_safe_drivers == DEFAULT_DMA_SAFE_DRIVERS


def test_example_file_loads() -> None:
    """examples/iommud.toml is valid (its first rule names group kvm, resolved at load)."""
    try:
        kvm_gid: int | None = grp.getgrnam("kvm").gr_gid
    except KeyError:
        kvm_gid = None
    if kvm_gid is None:
        with pytest.raises(ConfigError) as exc:
            load_config(EXAMPLE)
        assert exc.value.details["key"] == "access[0].group"
        return
    cfg = load_config(EXAMPLE)
    assert cfg.access[0].gid == kvm_gid
    assert cfg.access[0].quota == "vm"
    assert cfg.access[0].delegate is True
    assert cfg.access[1].uid == 1000
    assert cfg.access[1].delegate is False
    assert cfg.quotas["vm"] == Quota(pinned_bytes=512 << 20, max_ioas=4, max_mappings=1024)
    assert cfg.manage.rebind == ("1234:11e8",)


def test_full_config_normalises_and_resolves() -> None:
    cfg = parse_config(
        f"""
        [daemon]
        sys_root = "/tmp/fake/sys"
        [drivers]
        dma_safe_add = ["my_vfio_variant"]
        dma_safe_remove = ["pcieport"]
        [manage]
        rebind = ["1234:11E8", "0000:01:03.0", "*"]
        [[access]]
        user = "root"
        group = "{ROOT_GROUP}"
        devices = ["0000:0A:00.0"]
        quota = "small"
        [quotas.small]
        pinned_bytes = 4096
        """
    )
    assert cfg.daemon.sys_root == Path("/tmp/fake/sys")
    assert cfg.manage.rebind == ("1234:11e8", "0000:01:03.0", "*")
    rule = cfg.access[0]
    assert (rule.uid, rule.gid, rule.user, rule.group) == (0, 0, "root", ROOT_GROUP)
    assert (rule.devices, rule.quota) == (("0000:0a:00.0",), "small")
    assert cfg.dma_safe_drivers == (DEFAULT_DMA_SAFE_DRIVERS | {"my_vfio_variant"}) - {"pcieport"}
    assert set(cfg.quotas) == {"default", "small"}
    assert cfg.quotas["small"] == Quota(pinned_bytes=4096)


def test_config_is_frozen() -> None:
    cfg = parse_config("")
    with pytest.raises(Exception, match="frozen"):
        cfg.daemon.socket = Path("/x")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (
            '[daemon]\nsocket = "relative.sock"',
            "daemon.socket",
            "'relative.sock' must be an absolute path",
        ),
        ("[daemon]\nport = 1", "daemon.port", "unknown key"),
        ("[nonsense]\na = 1", "nonsense", "unknown key"),
        (
            '[[access]]\nuid = 1\ndevices = ["*"]\n'
            '[[access]]\nuid = 2\ndevices = ["1234:11e8", "eth0"]',
            "access[1].devices[1]",
            "'eth0' is not a device selector (a BDF like 0000:01:02.0, "
            'a vendor:device like 1234:11e8, or "*")',
        ),
        (
            "[[access]]\nuid = 1\ndevices = []",
            "access[0].devices",
            "Tuple should have at least 1 item after validation, not 0",
        ),
        ('[[access]]\ndevices = ["*"]', "access[0]", "a rule needs uid, gid, user or group"),
        (
            '[[access]]\nuid = 0\nuser = "root"\ndevices = ["*"]',
            "access[0]",
            "give uid or user, not both",
        ),
        (
            '[[access]]\nuser = "no-such-user-xyz"\ndevices = ["*"]',
            "access[0].user",
            "unknown user 'no-such-user-xyz'",
        ),
        (
            '[[access]]\ngroup = "no-such-group-xyz"\ndevices = ["*"]',
            "access[0].group",
            "unknown group 'no-such-group-xyz'",
        ),
        (
            '[[access]]\nuid = "1000"\ndevices = ["*"]',
            "access[0].uid",
            "Input should be a valid integer",
        ),
        (
            '[[access]]\nuid = -1\ndevices = ["*"]',
            "access[0].uid",
            "Input should be greater than or equal to 0",
        ),
        (
            '[[access]]\nuid = 1\ndevices = ["*"]\nquota = "gold"',
            "access[0].quota",
            "unknown quota 'gold' (defined: default)",
        ),
        (
            '[quotas.vm]\npinned_bytes = "12 parsecs"',
            "quotas.vm.pinned_bytes",
            "'12 parsecs' is not a size (an integer or e.g. \"512MiB\"; units B KiB MiB GiB TiB)",
        ),
        ("[quotas.vm]\nmax_ioas = true", "quotas.vm.max_ioas", "Input should be a valid integer"),
        (
            "[quotas.vm]\nmax_mappings = -5",
            "quotas.vm.max_mappings",
            "Input should be greater than or equal to 0",
        ),
        ('[drivers]\ndma_safe_add = "vfio-pci"', "drivers.dma_safe_add", "Input should be a list"),
        (
            '[drivers]\ndma_safe_remove = ["bad name!"]',
            "drivers.dma_safe_remove[0]",
            "'bad name!' is not a driver name",
        ),
        (
            '[manage]\nrebind = ["0000:01:02.9"]',
            "manage.rebind[0]",
            "'0000:01:02.9' is not a device selector (a BDF like 0000:01:02.0, "
            'a vendor:device like 1234:11e8, or "*")',
        ),
    ],
)
def test_errors_name_the_key(text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "test.toml")
    err = exc.value
    assert err.code is ErrorCode.BAD_REQUEST
    assert (err.details["path"], err.details["key"], err.details["problem"]) == (
        "test.toml",
        key,
        problem,
    )
    assert err.details["errors"][0] == {"key": key, "problem": problem}
    assert err.message.startswith(f"test.toml: {key}: {problem}")


def test_all_errors_are_listed() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config('[daemon]\nsocket = "x"\n[[access]]\nuid = 1\ndevices = ["*"]\nbogus = 2')
    assert [e["key"] for e in exc.value.details["errors"]] == ["daemon.socket", "access[0].bogus"]
    assert exc.value.message.endswith("(and 1 more)")


def test_toml_syntax_error_has_line_and_col(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text('[daemon]\nsocket = "/run/x.sock"\nstate_dir = /var/lib\n')
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert exc.value.details == {
        "path": str(p),
        "key": None,
        "problem": "Invalid value",
        "line": 3,
        "col": 13,
    }


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert exc.value.details == {
        "path": str(p),
        "key": None,
        "problem": "No such file or directory",
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("512MiB", 512 << 20),
        ("1 GiB", 1 << 30),
        ("2TiB", 2 << 40),
        ("7B", 7),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", [-1, "1.5GiB", "1GB", "MiB", True, 1.0, None])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"size"):
        parse_size(value)


def test_format_loc() -> None:
    assert format_loc(("access", 1, "devices", 0)) == "access[1].devices[0]"
    assert format_loc(("quotas", "vm", "max_ioas")) == "quotas.vm.max_ioas"
    assert format_loc(()) == "(top level)"


def test_uid_rule_for_existing_user_name() -> None:
    name = pwd.getpwuid(0).pw_name
    cfg = parse_config(f'[[access]]\nuser = "{name}"\ndevices = ["*"]')
    assert cfg.access[0].uid == 0
