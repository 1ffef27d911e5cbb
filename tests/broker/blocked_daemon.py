"""A daemon process whose driver restore is stuck in sysfs (child of test_shutdown.py).

``python -m tests.broker.blocked_daemon ROOT SOCKET``: builds the lab tree under ROOT,
serves with iommud.app.serve on iommud.app.run (uvloop, as in production) and a real
Broker over the fake kernel. Its host-watch hook (run as the watcher task once the broker
has started, tests/serving.py after_start) plays a client inside the process:
claims the edu device, releases it while keeping its copy of the device fd (so the fake
vfio-pci unbind blocks for an hour, as the kernel's would), then writes ROOT/blocked
with the pending restores and waits for SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from iommud.app import DaemonBroker, run, serve
from iommud.broker import Broker
from iommud.config import Config
from iommud.protocol import messages as m
from tests.broker.support import ALICE, EDU, Client, make_config
from tests.fakekernel import FakeKernel
from tests.fakesys import lab_topology
from tests.serving import after_start


def main(root: Path, socket_path: str) -> int:
    fs = lab_topology(root / "host")
    kernel = FakeKernel(fs, unbind_block_limit=3600.0)
    config = make_config(root, fs)

    def factory(_config: Config) -> Broker:
        return Broker(config, kernel, sysfs_timeout=0.5, restore_retry_delay=0.01, close_grace=1.0)

    async def hook(broker: DaemonBroker, _config: Config) -> None:
        assert isinstance(broker, Broker)
        client = Client(broker, ALICE)
        reply = await client.claim(EDU)
        await client.call(m.Release(id=client.next_id(), lease_id=reply.lease_id))
        # Written aside and renamed: the test polls for the file, and a plain write_text
        # lets it see the file created but still empty.
        (root / "blocked.tmp").write_text(json.dumps(broker.pending_restores))
        (root / "blocked.tmp").rename(root / "blocked")
        await asyncio.Event().wait()  # client.received stays open until the process ends

    return run(
        serve(config, factory, socket_path=socket_path, grace=1.0, host_watch=after_start(hook))
    )


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
