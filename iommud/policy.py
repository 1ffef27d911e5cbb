"""Access policy: who may claim which device, with what quota, and what may be rebound.

Pure functions of (config, identity, device): no I/O, no clocks, no globals. The
identity comes from SO_PEERCRED on the connection (the server fills it in).

Rules (``[[access]]`` in the config) are read in order:

- uid 0 may claim anything (root could open /dev/vfio itself anyway);
- a rule *applies* to a peer when its uid (if given) equals the peer's uid and its gid
  (if given) is the peer's primary or a supplementary group;
- a claim is allowed by the first applying rule whose device selectors match the
  device. Rules only grant, so order matters just for which rule is reported;
- otherwise the denial names the applying rules that did not cover the device, or says
  that no rule matched the peer at all;
- delegation (protocol v2's delegated claim: the peer gets the unbound cdev and owns
  binding, mapping and reset) is a right of its own: only rules with ``delegate = true``
  grant it. A peer whose matching rules all lack it is denied with reason
  ``delegate_not_allowed``, naming the first of them.

The quota of a peer is the quota of the first rule that applies to it (root and peers
without a rule get the "default" quota). It bounds the peer's uid over all its
connections (iommud.broker.ledger). IOAS requests (``ioas_create``, ``ioas_map``) need
an applying rule too (``check_ioas``): a peer no rule names may list and watch, but not
make the daemon pin memory for it.

Brokered pinning and RLIMIT_MEMLOCK: the daemon pins with CAP_IPC_LOCK, so the kernel
checks no memlock limit and charges the pages to the daemon, not to the client; the
client's own RLIMIT_MEMLOCK is neither consulted nor consumed. That is the design: the
``pinned_bytes`` quota is the administrator's memlock grant for brokered pinning (as
limits.conf would be for a VMM that pins itself), enforced per uid across all of the
uid's processes (stricter than the kernel's per-process rlimit), plus a daemon-wide
``[memory] pinned_bytes``. A delegated claim (protocol v2) is the other way round: the
VMM pins through its own iommufd in per-process accounting mode, against its own
RLIMIT_MEMLOCK (iommud.broker.delegation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from iommud.config import DEFAULT_QUOTA, AccessRule, Config, Quota
from iommud.errors import PermissionDeniedError
from iommud.host.snapshot import PciDevice
from iommud.host.viability import dma_capable

__all__ = [
    "Decision",
    "Identity",
    "check_claim",
    "check_ioas",
    "may_rebind",
    "quota_for",
    "selector_matches",
]


@dataclass(frozen=True, slots=True)
class Identity:
    """A peer's credentials (SO_PEERCRED plus its supplementary groups)."""

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    pid: int = 0

    @property
    def is_root(self) -> bool:
        return self.uid == 0


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a policy check: ``rule_index`` is the rule that decided, if any."""

    allowed: bool
    rule_index: int | None
    reason: str
    code: str | None = None
    """A machine-readable reason that replaces ``reason`` in the error's details."""

    def raise_if_denied(self, identity: Identity, device: PciDevice) -> None:
        """PermissionDeniedError with the device, the peer and the rule that applied."""
        if self.allowed:
            return
        details: dict[str, Any] = {
            "bdf": device.bdf,
            "uid": identity.uid,
            "gid": identity.gid,
            "rule": self.rule_index,
            "reason": self.code or self.reason,
        }
        raise PermissionDeniedError(f"claim of {device.bdf} denied: {self.reason}", **details)


def selector_matches(selector: str, device: PciDevice) -> bool:
    """Match one normalised selector (see iommud.config) against a device."""
    if selector == "*":
        return True
    if len(selector) == 9:  # "vvvv:dddd"
        return selector == device.vendor_device
    return selector == device.bdf


def _applies(rule: AccessRule, identity: Identity) -> bool:
    if rule.uid is not None and rule.uid != identity.uid:
        return False
    return rule.gid is None or rule.gid == identity.gid or rule.gid in identity.groups


def check_claim(
    config: Config, identity: Identity, device: PciDevice, *, delegate: bool = False
) -> Decision:
    """May ``identity`` claim ``device`` (in delegated mode when ``delegate``)?
    (Viability and ownership are decided elsewhere.)"""
    if identity.is_root:
        return Decision(True, None, "uid 0 may claim any device")
    applying: list[int] = []
    brokered_only: list[int] = []
    for i, rule in enumerate(config.access):
        if not _applies(rule, identity):
            continue
        if any(selector_matches(s, device) for s in rule.devices):
            if delegate and not rule.delegate:
                brokered_only.append(i)
                continue
            return Decision(True, i, f"allowed by {rule.describe(i)}")
        applying.append(i)
    if brokered_only:
        i = brokered_only[0]
        return Decision(
            False,
            i,
            f"{config.access[i].describe(i)} does not grant delegate = true",
            code="delegate_not_allowed",
        )
    if not applying:
        return Decision(False, None, f"no rule matched uid {identity.uid} gid {identity.gid}")
    rules = "; ".join(config.access[i].describe(i) for i in applying)
    return Decision(
        False,
        applying[0],
        f"{device.bdf} ({device.vendor_device}) is not covered by {rules}",
    )


def check_ioas(config: Config, identity: Identity) -> Decision:
    """May ``identity`` create IOASes and map memory? Root, or a peer an access rule
    applies to (whatever its devices: the quota of that rule bounds it)."""
    if identity.is_root:
        return Decision(True, None, "uid 0 may map memory")
    for i, rule in enumerate(config.access):
        if _applies(rule, identity):
            return Decision(True, i, f"allowed by {rule.describe(i)}")
    return Decision(
        False,
        None,
        f"no rule matched uid {identity.uid} gid {identity.gid}: IOAS requests need an "
        "[[access]] rule",
        code="no_access_rule",
    )


def quota_for(config: Config, identity: Identity) -> Quota:
    """The quota of the first rule that applies to the peer, else the default quota."""
    if not identity.is_root:
        for rule in config.access:
            if _applies(rule, identity):
                return config.quotas[rule.quota]
    return config.quotas[DEFAULT_QUOTA]


def may_rebind(config: Config, device: PciDevice) -> bool:
    """May the daemon move ``device`` to vfio-pci? Never for bridges and ports.

    vfio-pci refuses bridges (drivers/vfio/pci/vfio_pci_core.c,
    vfio_pci_core_register_device accepts only PCI_HEADER_TYPE_NORMAL), and unbinding
    pcieport from a port would tear down hotplug/AER for everything below it, so no
    selector (not even "*") can ask for that.
    """
    if not dma_capable(device):
        return False
    return any(selector_matches(s, device) for s in config.manage.rebind)
