"""Runs ``iommud.app.main`` with the stand-in broker (used as a child process by tests)."""

from __future__ import annotations

import sys

from iommud.app import main
from tests.server.support import StandInDaemonBroker

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], broker_factory=lambda _config: StandInDaemonBroker()))
