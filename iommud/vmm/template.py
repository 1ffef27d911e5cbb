"""The VMM command line of ``iommuctl vm``: placeholders in, fd numbers out. Pure.

The user writes the VMM's argv with placeholders where the claimed fds go::

    qemu-system-x86_64 ... -object iommufd,id=i0,fd={iommufd} \\
        -device vfio-pci,id=dev0,iommufd=i0,bus=rp0,fd={0000:00:10.0}

A ``--hold`` device is claimed (a group is delegated whole: every DMA-capable device of it
in one claim) but given to no one: it sits on vfio-pci, unused, while the VM runs (the
lab's bridge group: its e1000 is held while the two edus go to the VM).

``{iommufd}`` is the delegated /dev/iommu fd (one per VM: QEMU makes one IOAS per
``-object iommufd``, so two objects would pin guest RAM twice, docs in PROTOCOL.md
section 12) and ``{BDF}`` is the unbound cdev fd of a device given with ``--device``
(``{00:10.0}`` is ``{0000:00:10.0}``). A token ``{name}`` whose name is made of letters,
digits and ``_ . : -`` is a placeholder; anything else in braces (QEMU's JSON option
syntax, ``-object '{"qom-type":...}'``) is left alone. ``parse_template`` checks the
whole line before anything is claimed: an unknown placeholder, a device placeholder
without ``--device``, a ``--device`` without its placeholder, a placeholder used twice,
``{iommufd}`` missing (or present without a device), a device placeholder outside a
``-device`` option or ``{iommufd}`` outside an ``-object`` option, and ``-daemonize``
(the launcher supervises the VMM, which must stay its child) are all ``TemplateError``.

The launcher needs each device's QEMU id (``device_del`` on revocation) and the iommufd
object's id (``device_add`` on hotplug): they are read from the option that holds the
placeholder (keyval ``id=...`` or JSON ``"id"``); a device without an id gets
``iommuctl-<bdf>`` added. No I/O, no daemon, no QEMU: strings in, strings out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

IOMMUFD: Final = "iommufd"
PLACEHOLDER: Final = re.compile(r"\{([A-Za-z0-9_.:-]+)\}")
_BDF: Final = re.compile(r"^(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")
_DEVICE_OPTIONS: Final = frozenset({"-device", "--device"})
_OBJECT_OPTIONS: Final = frozenset({"-object", "--object"})
_REFUSED_OPTIONS: Final = {
    "-daemonize": "the launcher supervises the VMM, which must stay its child",
    "--daemonize": "the launcher supervises the VMM, which must stay its child",
}


class TemplateError(ValueError):
    """The VMM command line or the ``--device`` list is not usable; nothing was claimed."""


def normalize_bdf(text: str) -> str | None:
    """``0000:00:10.0`` for ``00:10.0`` or ``0000:00:10.0`` (any case); None if not a BDF."""
    m = _BDF.match(text.strip().lower())
    if m is None:
        return None
    domain, bus, slot, fn = m.groups()
    return f"{domain or '0000'}:{bus}:{slot}.{fn}"


def qdev_id_for(bdf: str) -> str:
    """A QEMU id for a device that has none (ids: a letter, then letters, digits, ``-._``)."""
    return "iommuctl-" + bdf.replace(":", "-")


def split_keyval(text: str) -> list[str]:
    """QEMU's ``a,b=c,d=e,,f`` -> ``["a", "b=c", "d=e,f"]`` (``,,`` is a literal comma)."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def option_id(value: str) -> str | None:
    """The ``id`` of a -device/-object option value (keyval or JSON), or None."""
    if value.lstrip().startswith("{"):
        try:
            obj = json.loads(value)
        except ValueError:
            return None
        found = obj.get("id") if isinstance(obj, dict) else None
        return found if isinstance(found, str) else None
    for part in split_keyval(value)[1:]:
        key, sep, val = part.partition("=")
        if sep and key == "id":
            return val
    return None


def with_id(value: str, qdev_id: str) -> str:
    """``value`` with ``id`` set (it had none)."""
    if value.lstrip().startswith("{"):
        obj = json.loads(value)
        obj["id"] = qdev_id
        return json.dumps(obj, separators=(",", ":"))
    return f"{value},id={qdev_id}"


@dataclass(frozen=True, slots=True)
class Template:
    """A checked VMM command line: ``render`` fills in the fd numbers."""

    argv: tuple[str, ...]
    #: The ``--device`` BDFs (normalized), in the order given.
    devices: tuple[str, ...]
    #: The ``--hold`` BDFs: claimed with their group (the group rule), given to no one.
    held: tuple[str, ...]
    #: The QEMU id of each device's ``-device`` option.
    qdev_ids: Mapping[str, str]
    #: The id of the ``-object iommufd`` that holds ``{iommufd}`` (None without devices).
    iommufd_object: str | None

    def render(self, fds: Mapping[str, int], extra: Sequence[str] = ()) -> list[str]:
        """The argv with every placeholder replaced by its fd number, then ``extra``.

        ``fds`` maps ``"iommufd"`` and each device BDF to the fd the VMM will inherit.
        """

        def fill(m: re.Match[str]) -> str:
            name = m.group(1)
            key = IOMMUFD if name == IOMMUFD else normalize_bdf(name)
            assert key is not None  # parse_template let only known names through
            return str(fds[key])

        return [PLACEHOLDER.sub(fill, arg) for arg in self.argv] + list(extra)


def _placeholders(arg: str) -> list[str]:
    return PLACEHOLDER.findall(arg)


def _bdfs(option: str, texts: Sequence[str], taken: Sequence[str]) -> list[str]:
    out: list[str] = []
    for text in texts:
        bdf = normalize_bdf(text)
        if bdf is None:
            raise TemplateError(f"{option} {text!r} is not a PCI address (DDDD:BB:DD.F)")
        if bdf in out or bdf in taken:
            raise TemplateError(f"{bdf} is given twice")
        out.append(bdf)
    return out


def parse_template(
    argv: Sequence[str], devices: Sequence[str], held: Sequence[str] = ()
) -> Template:
    """Check ``argv`` against the ``--device`` (and ``--hold``) lists; the ``Template``
    or ``TemplateError``."""
    if not argv:
        raise TemplateError("no VMM command: give it after --")
    wanted = _bdfs("--device", devices, ())
    kept = _bdfs("--hold", held, wanted)
    for arg in argv:
        if arg in _REFUSED_OPTIONS:
            raise TemplateError(f"{arg} is not allowed: {_REFUSED_OPTIONS[arg]}")

    out = list(argv)
    seen: dict[str, int] = {}  # placeholder key -> argv index
    qdev_ids: dict[str, str] = {}
    iommufd_object: str | None = None
    for i, arg in enumerate(argv):
        option = argv[i - 1] if i > 0 else ""
        for name in _placeholders(arg):
            key = IOMMUFD if name == IOMMUFD else normalize_bdf(name)
            if key is None:
                raise TemplateError(
                    f"unknown placeholder {{{name}}}: use {{iommufd}} or {{BDF}} of a --device"
                )
            if key in kept:
                raise TemplateError(
                    f"placeholder {{{name}}} names {key}, a --hold device (given to no one): "
                    f"use --device {key} to pass it to the VMM"
                )
            if key != IOMMUFD and key not in wanted:
                raise TemplateError(
                    f"placeholder {{{name}}} names {key}, which is not claimed: add --device {key}"
                )
            if key in seen:
                what = (
                    "one -object iommufd per VM (two would pin guest RAM twice)"
                    if key == IOMMUFD
                    else "a device fd can be bound once"
                )
                raise TemplateError(f"placeholder {{{name}}} is used twice: {what}")
            seen[key] = i
            if key == IOMMUFD:
                if option not in _OBJECT_OPTIONS:
                    raise TemplateError("{iommufd} must be in an -object iommufd,... option")
                iommufd_object = option_id(arg)
                if iommufd_object is None:
                    raise TemplateError("the -object holding {iommufd} needs an id=")
            else:
                if option not in _DEVICE_OPTIONS:
                    raise TemplateError(
                        f"placeholder {{{name}}} must be in a -device vfio-pci,... option "
                        "(the launcher needs the device's id to unplug it)"
                    )
                found = option_id(out[i])
                if found is None:
                    found = qdev_id_for(key)
                    out[i] = with_id(out[i], found)
                qdev_ids[key] = found
    missing = [bdf for bdf in wanted if bdf not in seen]
    if missing:
        raise TemplateError(
            f"--device {missing[0]} has no placeholder: put fd={{{missing[0]}}} in its -device"
        )
    if wanted and IOMMUFD not in seen:
        raise TemplateError("devices need -object iommufd,id=ID,fd={iommufd} on the command line")
    if kept and not wanted:
        raise TemplateError("--hold comes with the --device of its group (nothing to hold for)")
    if not wanted and IOMMUFD in seen:
        raise TemplateError("{iommufd} needs at least one --device (it comes with a claim)")
    return Template(tuple(out), tuple(wanted), tuple(kept), qdev_ids, iommufd_object)
