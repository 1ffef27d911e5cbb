"""The real daemon process over a fake host, for tests that attack it from outside.

``python -m tests.server.fake_daemon ROOT SOCKET LIMITS_JSON [DEVICES]``: builds the lab
tree (or, with DEVICES, ``tests.fakesys.large_host`` of that many devices) under ROOT,
and serves it with ``iommud.app.serve`` on ``iommud.app.run`` (uvloop, as in
production): the real server and a real Broker over the fake kernel. LIMITS_JSON
overrides ``[connections]`` keys. The socket is mode 0666 so a test can connect as
another uid. Logs are JSON lines on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from iommud import logs
from iommud.app import run, serve
from iommud.broker import Broker
from iommud.config import Config, ConnectionsConfig
from tests.broker.support import make_config
from tests.fakekernel import FakeKernel
from tests.fakesys import lab_topology, large_host


def main(root: Path, socket_path: str, limits: str, devices: int = 0) -> int:
    logs.configure(level="info", json=True)
    if devices:
        fs = large_host(root / "host", devices, max(1, devices // 4))
    else:
        fs = lab_topology(root / "host")
    kernel = FakeKernel(fs)
    config = make_config(root, fs).model_copy(
        update={"connections": ConnectionsConfig(**json.loads(limits))}
    )

    def factory(_config: Config) -> Broker:
        return Broker(config, kernel, restore_retry_delay=0.01, close_grace=1.0)

    return run(serve(config, factory, socket_path=socket_path, socket_mode=0o666, host_watch=None))


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], *map(int, sys.argv[4:5])))
