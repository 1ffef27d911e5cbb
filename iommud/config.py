"""The daemon's configuration: a TOML file validated into frozen pydantic models.

Example (every table and key is optional; an empty file is a valid config)::

    [daemon]
    socket = "/run/iommud/iommud.sock"
    sys_root = "/sys"
    dev_root = "/dev"
    state_dir = "/var/lib/iommud"        # the rebind journal lives here

    [drivers]
    dma_safe_add = ["my_vfio_variant"]   # extend the kernel's driver_managed_dma list
    dma_safe_remove = ["pcieport"]       # or narrow it

    [manage]
    rebind = ["1234:11e8"]               # devices the daemon may rebind to vfio-pci

    [[access]]                           # first rule whose principal matches applies
    user = "alice"                       # or uid = 1000; group = "kvm" or gid = 36
    devices = ["1234:11e8", "0000:01:03.0"]   # BDF, vendor:device or "*"
    quota = "vm"
    delegate = true                      # may also claim in delegated mode (default false)

    [quotas.vm]                          # per uid, over all its connections
    pinned_bytes = "512MiB"
    max_ioas = 4
    max_mappings = 1024
    max_memfds = 64                      # files the daemon keeps mmapped for the uid
    memfd_bytes = "1TiB"                 # their total size

    [memory]                             # daemon-wide, over every uid
    pinned_bytes = "64GiB"
    max_ioas = 1024
    max_mappings = 65536
    max_memfds = 8192                    # never more than vm.max_map_count / 4
    memfd_bytes = "16TiB"

User and group names are resolved to ids when the file is loaded (the only I/O besides
reading the file). Every problem becomes a ConfigError whose details name the key path
(``access[1].devices[0]``) and the problem; TOML syntax errors carry line and column.
This module decides nothing: access decisions live in :mod:`iommud.policy`.
"""

from __future__ import annotations

import grp
import pwd
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Final

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from iommud.errors import ConfigError
from iommud.host.snapshot import DEFAULT_DEV_ROOT, DEFAULT_SYS_ROOT
from iommud.host.viability import DEFAULT_DMA_SAFE_DRIVERS
from iommud.pci import BDF_RE
from iommud.transport import DEFAULT_SOCKET

__all__ = [
    "DEFAULT_QUOTA",
    "AccessRule",
    "Config",
    "ConnectionsConfig",
    "DaemonConfig",
    "DriversConfig",
    "ManageConfig",
    "MemoryLimits",
    "Quota",
    "format_loc",
    "load_config",
    "parse_config",
    "parse_size",
]

DEFAULT_QUOTA: Final = "default"

_VENDOR_DEVICE_RE: Final = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{4}$")
_DRIVER_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SIZE_RE: Final = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)?\s*$")
_UNITS: Final = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def _selector(value: str) -> str:
    """A device selector: a BDF, vendor:device (hex) or "*"; normalised to lowercase."""
    v = value.strip().lower()
    if v == "*" or BDF_RE.match(v) or _VENDOR_DEVICE_RE.match(v):
        return v
    raise ValueError(
        f"{value!r} is not a device selector (a BDF like 0000:01:02.0, "
        'a vendor:device like 1234:11e8, or "*")'
    )


def _driver_name(value: str) -> str:
    if not _DRIVER_RE.match(value):
        raise ValueError(f"{value!r} is not a driver name")
    return value


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as "512MiB" (units B, KiB, MiB, GiB, TiB)."""
    if isinstance(value, bool):
        raise ValueError("expected a size, got a boolean")  # noqa: TRY004 (pydantic wants ValueError)
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(
        f'{value!r} is not a size (an integer or e.g. "512MiB"; units B KiB MiB GiB TiB)'
    )


def _known(lookup: Callable[[str], object], kind: str) -> Callable[[str], str]:
    """A validator: the name must resolve on this host (checked at load, not per request)."""

    def check(name: str) -> str:
        try:
            lookup(name)
        except KeyError:
            raise ValueError(f"unknown {kind} {name!r}") from None
        return name

    return check


Selector = Annotated[str, AfterValidator(_selector)]
UserName = Annotated[str, AfterValidator(_known(pwd.getpwnam, "user"))]
GroupName = Annotated[str, AfterValidator(_known(grp.getgrnam, "group"))]
DriverName = Annotated[str, AfterValidator(_driver_name)]
Size = Annotated[int, BeforeValidator(parse_size)]
Count = Annotated[int, Field(strict=True, ge=0)]  # strict: TOML true is not 1
Positive = Annotated[int, Field(strict=True, ge=1)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DaemonConfig(_Model):
    socket: Path = Path(DEFAULT_SOCKET)
    sys_root: Path = DEFAULT_SYS_ROOT
    dev_root: Path = DEFAULT_DEV_ROOT
    state_dir: Path = Path("/var/lib/iommud")

    @field_validator("socket", "sys_root", "dev_root", "state_dir", mode="before")
    @classmethod
    def _absolute(cls, v: object) -> object:
        if isinstance(v, str) and "\0" in v:
            raise ValueError("must not contain a NUL character")  # no OS call takes it
        if isinstance(v, str) and not v.startswith("/"):
            raise ValueError(f"{v!r} must be an absolute path")
        return Path(v) if isinstance(v, str) else v


class DriversConfig(_Model):
    dma_safe_add: tuple[DriverName, ...] = ()
    dma_safe_remove: tuple[DriverName, ...] = ()


class ManageConfig(_Model):
    rebind: tuple[Selector, ...] = ()


class Quota(_Model):
    """Per-uid limits: one uid's usage over all its connections (the broker enforces
    them, iommud.broker.ledger). ``max_memfds``/``memfd_bytes`` bound the daemon's own
    mappings of the uid's files (the mmap path of kernels without IOMMU_IOAS_MAP_FILE:
    one daemon mapping, one VMA, per file)."""

    pinned_bytes: Size = 1 << 30
    max_ioas: Count = 8
    max_mappings: Count = 4096
    max_memfds: Count = 64
    memfd_bytes: Size = 1 << 40


class MemoryLimits(_Model):
    """Daemon-wide limits over every uid together (``[memory]``). ``max_memfds`` is
    further capped at start-up to a quarter of vm.max_map_count, so client files can
    never take the VMAs the daemon needs for its own memory and threads."""

    pinned_bytes: Size = 64 << 30
    max_ioas: Count = 1024
    max_mappings: Count = 65536
    max_memfds: Count = 8192
    memfd_bytes: Size = 16 << 40


class AccessRule(_Model):
    """Who (uid and/or gid; names resolved at load) may claim which devices.

    When both uid and gid are given, both must match; gid matches the primary or any
    supplementary group of the peer.
    """

    uid: Count | None = None
    gid: Count | None = None
    user: UserName | None = None
    group: GroupName | None = None
    devices: tuple[Selector, ...] = Field(min_length=1)
    quota: str = DEFAULT_QUOTA
    delegate: bool = False
    """Delegated claims too (protocol v2): the peer gets the device's cdev and binds it."""

    @model_validator(mode="after")
    def _resolve_names(self) -> AccessRule:
        if self.user is not None and self.uid is not None:
            raise ValueError("give uid or user, not both")
        if self.group is not None and self.gid is not None:
            raise ValueError("give gid or group, not both")
        if self.user is not None:
            object.__setattr__(self, "uid", pwd.getpwnam(self.user).pw_uid)
        if self.group is not None:
            object.__setattr__(self, "gid", grp.getgrnam(self.group).gr_gid)
        if self.uid is None and self.gid is None:
            raise ValueError("a rule needs uid, gid, user or group")
        return self

    def describe(self, index: int) -> str:
        who = []
        if self.uid is not None:
            who.append(f"uid {self.uid}" + (f" ({self.user})" if self.user else ""))
        if self.gid is not None:
            who.append(f"gid {self.gid}" + (f" ({self.group})" if self.group else ""))
        return f"access[{index}] ({' and '.join(who)}: {', '.join(self.devices)})"


class DelegationConfig(_Model):
    """Revocation of delegated leases (protocol v2; iommud.broker.revocation).

    ``grace_s``: seconds between ``lease_revoked`` (DMA already blocked) and the kill of
    every process still holding one of the lease's device files; the VMM must unplug
    the device (QEMU: ``device_del``) and close its fd within it. ``kill_passes``:
    scan-and-kill rounds before the daemon gives up and leaves the group ``stuck``
    (owned, on vfio-pci, DMA detached) for an admin; ``kill_wait_s``: how long one pass
    waits for its killed processes to exit. ``unmap_scan_ids``: iommufd object ids probed
    for the VMM's IOASes to empty (ids are first-fit from 1). The claim lock is held
    while killing: other clients' claims and releases wait at most
    ``kill_passes`` x ``kill_wait_s``.
    """

    grace_s: float = Field(default=10.0, ge=0.0, le=3600.0, allow_inf_nan=False)
    kill_passes: int = Field(default=5, strict=True, ge=1, le=50)
    kill_wait_s: float = Field(default=5.0, gt=0.0, le=60.0, allow_inf_nan=False)
    unmap_scan_ids: int = Field(default=1024, strict=True, ge=1, le=1 << 20)


class ConnectionsConfig(_Model):
    """What one peer's connections may hold (iommud.server.handler.ConnectionLimits has
    the meaning of each; PROTOCOL.md section 10 the error a peer gets)."""

    max_total: Positive = 1024
    max_per_uid: Positive = 64
    hello_timeout: Seconds = 10.0
    idle_timeout: Seconds = 600.0
    send_timeout: Seconds = 10.0
    max_unsent_bytes: Size = Field(default=256 * 1024, ge=64 * 1024)
    max_held_fds: Positive = Field(default=64, ge=16)  # at least one datagram's MAX_FDS
    fd_reserve: Count = 256


class Config(_Model):
    daemon: DaemonConfig = DaemonConfig()
    connections: ConnectionsConfig = ConnectionsConfig()
    drivers: DriversConfig = DriversConfig()
    manage: ManageConfig = ManageConfig()
    delegation: DelegationConfig = DelegationConfig()
    access: tuple[AccessRule, ...] = ()
    memory: MemoryLimits = MemoryLimits()
    quotas: dict[str, Quota] = Field(default_factory=lambda: {DEFAULT_QUOTA: Quota()})

    @field_validator("quotas")
    @classmethod
    def _with_default(cls, v: dict[str, Quota]) -> dict[str, Quota]:
        # A "default" quota always exists; the file may override its values.
        return v if DEFAULT_QUOTA in v else {DEFAULT_QUOTA: Quota(), **v}

    @model_validator(mode="after")
    def _quotas_exist(self) -> Config:
        for i, rule in enumerate(self.access):
            if rule.quota not in self.quotas:
                known = ", ".join(sorted(self.quotas))
                raise _KeyedError(
                    f"access[{i}].quota", f"unknown quota {rule.quota!r} (defined: {known})"
                )
        return self

    @property
    def dma_safe_drivers(self) -> frozenset[str]:
        """The kernel's driver_managed_dma list, plus dma_safe_add, minus dma_safe_remove."""
        return (DEFAULT_DMA_SAFE_DRIVERS | frozenset(self.drivers.dma_safe_add)) - frozenset(
            self.drivers.dma_safe_remove
        )


class _KeyedError(ValueError):
    """A cross-field error that knows its own key path (pydantic would report it at the root)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


def format_loc(loc: tuple[int | str, ...]) -> str:
    """pydantic's ``("access", 1, "devices", 0)`` -> ``"access[1].devices[0]"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


_TOML_POS_RE: Final = re.compile(r"\(at line (\d+), column (\d+)\)")


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML text; ConfigError on any problem."""
    try:
        raw = tomllib.loads(text)
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ConfigError(
            f"{source}: TOML nested too deeply",
            path=source,
            key=None,
            problem="nested too deeply",
        ) from None
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _TOML_POS_RE.search(msg)
        pos: dict[str, Any] = {"line": int(m.group(1)), "col": int(m.group(2))} if m else {}
        raise ConfigError(
            f"{source}: TOML syntax error: {msg}",
            path=source,
            key=None,
            problem=_TOML_POS_RE.sub("", msg).strip(),
            **pos,
        ) from None
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        errors = [_describe(e) for e in exc.errors(include_url=False)]
        first = errors[0]
        raise ConfigError(
            f"{source}: {first['key']}: {first['problem']}"
            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
            path=source,
            key=first["key"],
            problem=first["problem"],
            errors=errors,
        ) from None


def _describe(err: Any) -> dict[str, str]:
    ctx_error = err.get("ctx", {}).get("error")
    if isinstance(ctx_error, _KeyedError):
        return {"key": ctx_error.key, "problem": ctx_error.problem}
    problem = str(err["msg"])
    if problem.startswith("Value error, "):
        problem = problem[len("Value error, ") :]
    if err["type"] in ("tuple_type", "list_type"):
        problem = "Input should be a list"
    elif err["type"] == "extra_forbidden":
        problem = "unknown key"
    return {"key": format_loc(tuple(err["loc"])), "problem": problem}


def load_config(path: Path) -> Config:
    """Read and validate a config file; ConfigError naming the file and key on failure."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(
            f"cannot read config {path}: {problem}", path=str(path), key=None, problem=problem
        ) from exc
    return parse_config(text, str(path))
