"""PCI address syntax shared by the layers that read or write sysfs.

``BDF_RE`` matches a full, lowercase PCI address as sysfs spells it
("0000:01:02.0": domain, bus, device, function). The wire protocol validates the
stricter form (``BDF_PATTERN`` in iommud.protocol.fields: device number below 0x20); this one only
guards what is read from or written to sysfs. No I/O here.
"""

from __future__ import annotations

import re
from typing import Final

BDF_RE: Final = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
