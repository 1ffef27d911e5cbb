"""The client library and the shared error hierarchy stay free of the daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import iommud

ROOT = Path(iommud.__file__).resolve().parents[1]
DAEMON = ("iommud.server", "iommud.broker", "iommud.kernel", "iommud.host", "iommud.app")


def loaded_by(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return {name for name in json.loads(out.stdout) if name.startswith("iommud")}


def test_client_loads_no_daemon_module() -> None:
    """A VMM importing iommud.client gets the protocol, transport and errors, no daemon."""
    ours = loaded_by("iommud.client")
    assert "iommud.transport" in ours
    assert not {name for name in ours if name.startswith(DAEMON)}


def test_errors_load_only_the_protocol() -> None:
    """iommud.errors imports nothing of ours but the protocol package."""
    ours = loaded_by("iommud.errors")
    assert ours - {"iommud", "iommud.errors"} <= {
        name for name in ours if name.startswith("iommud.protocol")
    }


def test_the_vm_launcher_loads_no_daemon_module() -> None:
    """iommuctl vm is a client: the launcher and iommuctl load nothing of the daemon."""
    for module in ("iommud.vmm.launcher", "iommud.cli"):
        ours = loaded_by(module)
        assert not {name for name in ours if name.startswith(DAEMON)}, module
