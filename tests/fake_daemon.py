"""The real daemon process over the fake kernel (a child of host tests; see tests/serving.py).

``python -m tests.fake_daemon ROOT [iommud args]``: builds the lab tree under ROOT
(tests/fakesys.py lab_topology) and runs ``iommud.app.main`` with the real Broker on
tests/fakekernel.py's FakeKernel over that tree: the real process (uvloop, signals,
logging, the server, the broker, the daemon's own mmaps of client memory) with only the
kernel's IOMMU objects faked. The config (``--config``) names ROOT/sys and ROOT/dev.
"""

from __future__ import annotations

import sys
from pathlib import Path

from iommud.app import main
from iommud.broker import Broker
from tests.fakekernel import FakeKernel
from tests.fakesys import lab_topology

if __name__ == "__main__":
    fs = lab_topology(Path(sys.argv[1]))
    sys.exit(main(sys.argv[2:], broker_factory=lambda config: Broker(config, FakeKernel(fs))))
