"""iommud.protocol must stay sans-I/O: no asyncio, sockets, udev, logging, or daemon code."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import iommud.protocol

PACKAGE = Path(iommud.protocol.__file__).parent
CORE = (
    "codec",
    "connection",
    "errors",
    "events",
    "exceptions",
    "fields",
    "limits",
    "messages",
    "v2",
)
FORBIDDEN_ROOTS = {"asyncio", "socket", "pyudev", "structlog", "uvloop", "selectors", "os"}
ALLOWED_IMPORTS = {
    "__future__",
    "annotated_types",
    "collections.abc",
    "enum",
    "json",
    "math",
    "pydantic",
    "pydantic_core",
    "types",
    "typing",
}

# pydantic itself pulls in socket when it first builds a model (plugin discovery via
# importlib.metadata -> email). So compare against a baseline of what pydantic loads
# when used, and separately check our own import statements.
PROBE = """
import importlib, json, sys
for name in {baseline!r}:
    importlib.import_module(name)
from pydantic import BaseModel, TypeAdapter
class M(BaseModel):
    x: int
TypeAdapter(M).validate_json('{{"x": 1}}')
before = set(sys.modules)
for name in {modules!r}:
    importlib.import_module(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def newly_loaded(modules: list[str], baseline: list[str]) -> set[str]:
    code = PROBE.format(modules=modules, baseline=baseline)
    out = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parents[1],
    )
    return set(json.loads(out.stdout))


BASELINE = ["pydantic", "pydantic_core", "annotated_types", "json", "math", "enum"]


def test_core_loads_no_io_or_daemon_modules() -> None:
    """Importing the core loads nothing forbidden beyond what pydantic already loads."""
    loaded = newly_loaded([f"iommud.protocol.{name}" for name in CORE], BASELINE)
    assert {f"iommud.protocol.{name}" for name in CORE} <= loaded
    roots = {name.split(".")[0] for name in loaded}
    assert roots.isdisjoint(FORBIDDEN_ROOTS), roots & FORBIDDEN_ROOTS
    ours = {name for name in loaded if name.startswith("iommud")}
    assert ours <= {f"iommud.protocol.{name}" for name in CORE} | {"iommud", "iommud.protocol"}


def test_probe_detects_forbidden_imports() -> None:
    """The probe itself works: importing asyncio after the baseline shows up."""
    assert "asyncio" in newly_loaded(["asyncio"], BASELINE)


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            assert node.module is not None
            names.add(node.module)
    return names


def test_core_import_statements_are_allowlisted() -> None:
    """Every import statement in the core names an allowed module or iommud.protocol.*."""
    for name in CORE:
        for imported in imports_of(PACKAGE / f"{name}.py"):
            assert imported in ALLOWED_IMPORTS or imported.startswith("iommud.protocol."), (
                f"{name}.py imports {imported}"
            )


def test_every_core_module_is_listed() -> None:
    """A new module in iommud/protocol/ must be added to CORE."""
    found = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert found == set(CORE)
