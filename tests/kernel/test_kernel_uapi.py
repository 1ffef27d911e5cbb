"""Cross-check iommud.kernel.uapi against the kernel's own uapi headers.

A tiny C program, generated from the Python definitions, is compiled with gcc
against include/uapi/linux/{iommufd,vfio}.h from Debian's linux-source-6.12 tarball
and prints sizeof, offsetof and every constant; the test compares them with ctypes.
Skips (with the reason) when gcc or the tarball is missing.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from iommud.kernel import uapi

TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
HEADERS = ("include/uapi/linux/iommufd.h", "include/uapi/linux/vfio.h")


def _cache_dir() -> Path:
    base = os.environ.get("IOMMUD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "iommud"
    )
    st = TARBALL.stat()
    return Path(base) / "uapi-headers" / f"{st.st_size}-{int(st.st_mtime)}"


def _extract(dest: Path) -> None:
    """Extract just the two headers (decompressing the whole tarball once: ~8 s)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent))
    try:
        subprocess.run(
            ["tar", "-xJf", str(TARBALL), "-C", str(tmp), "--wildcards"]
            + [f"*/{h}" for h in HEADERS],
            check=True,
            capture_output=True,
        )
        (top,) = list(tmp.iterdir())
        os.rename(top / "include", tmp / "include")
        shutil.rmtree(top)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@pytest.fixture(scope="module")
def uapi_include() -> Path:
    """The include/uapi directory holding the 6.12 iommufd.h and vfio.h."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    if not TARBALL.exists():
        pytest.skip(f"{TARBALL} missing (apt-get install linux-source-6.12)")
    dest = _cache_dir()
    if not all((dest / h).exists() for h in HEADERS):
        try:
            _extract(dest)
        except OSError:  # unwritable cache, or a concurrent run won the rename
            if not all((dest / h).exists() for h in HEADERS):
                dest = Path(tempfile.mkdtemp()) / "h"
                _extract(dest)
    return dest / "include" / "uapi"


def _header_text(include: Path) -> str:
    return "".join((include / "linux" / n).read_text() for n in ("iommufd.h", "vfio.h"))


def _constants() -> dict[str, int]:
    """Public integer constants of the uapi module (ioctl numbers, flags, enums)."""
    return {
        name: value
        for name, value in vars(uapi).items()
        if re.fullmatch(r"(IOMMU|IOMMUFD|VFIO)_[A-Za-z0-9_]+", name) and isinstance(value, int)
    }


@pytest.fixture(scope="module")
def compiled(uapi_include: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Values printed by a C program compiled against the headers, keyed like
    "sizeof:iommu_ioas_map", "offsetof:iommu_ioas_map.iova" and "const:IOMMU_IOAS_MAP"."""
    text = _header_text(uapi_include)
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/iommufd.h>",
        "#include <linux/vfio.h>",
        "int main(void) {",
    ]
    for name, cls in uapi.STRUCTS.items():
        if f"struct {name} {{" not in text:
            continue
        lines.append(f'printf("sizeof:{name} %zu\\n", sizeof(struct {name}));')
        for field, *_ in cls._fields_:
            lines.append(
                f'printf("offsetof:{name}.{field} %zu\\n", offsetof(struct {name}, {field}));'
            )
    for name in _constants():
        if re.search(rf"\b{name}\b", text):
            lines.append(f'printf("const:{name} %llu\\n", (unsigned long long)({name}));')
    lines += ["return 0;", "}"]
    work = tmp_path_factory.mktemp("uapi-check")
    (work / "check.c").write_text("\n".join(lines) + "\n")
    # Raw (not headers_install'ed) uapi headers still carry the __user annotation.
    cc = subprocess.run(
        [
            "gcc",
            "-D__user=",
            "-I",
            str(uapi_include),
            "-o",
            str(work / "check"),
            str(work / "check.c"),
        ],
        capture_output=True,
        text=True,
    )
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(work / "check")], check=True, capture_output=True, text=True)
    return {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}


def test_every_struct_size_and_offset_matches_the_headers(compiled: dict[str, int]) -> None:
    checked = 0
    for name, cls in uapi.STRUCTS.items():
        if f"sizeof:{name}" not in compiled:
            assert name == "iommu_ioas_map_file", f"struct {name} missing from the 6.12 headers"
            continue
        assert ctypes.sizeof(cls) == compiled[f"sizeof:{name}"], name
        for field, *_ in cls._fields_:
            assert getattr(cls, field).offset == compiled[f"offsetof:{name}.{field}"], (
                f"{name}.{field}"
            )
            checked += 1
    assert checked > 60  # the generated program really covered the fields


def test_every_ioctl_number_and_constant_matches_the_headers(compiled: dict[str, int]) -> None:
    consts = {k.removeprefix("const:"): v for k, v in compiled.items() if k.startswith("const:")}
    # Everything but the 6.13-only MAP_FILE must be in the 6.12 headers.
    assert set(uapi.IOCTLS) - {"IOMMU_IOAS_MAP_FILE"} <= set(consts)
    for name, value in consts.items():
        assert _constants()[name] == value, name
    assert len(consts) > 50


def test_map_file_matches_the_6_13_layout(uapi_include: Path) -> None:
    """IOMMU_IOAS_MAP_FILE is not in the 6.12 headers; check it against 6.13's text:
    size, flags, ioas_id u32, fd s32, start/length/iova aligned u64; cmd 0x8f."""
    if "iommu_ioas_map_file" in _header_text(uapi_include):
        pytest.skip("headers define it: covered by the generic comparison")
    cls = uapi.iommu_ioas_map_file
    offsets = {f: getattr(cls, f).offset for f, *_ in cls._fields_}
    assert offsets == {
        "size": 0,
        "flags": 4,
        "ioas_id": 8,
        "fd": 12,
        "start": 16,
        "length": 24,
        "iova": 32,
    }
    assert ctypes.sizeof(cls) == 40
    assert (ord(";") << 8) | 0x8F == uapi.IOMMU_IOAS_MAP_FILE


def test_new_sets_the_leading_size_field() -> None:
    assert uapi.iommu_ioas_map.new(ioas_id=3).size == 40
    assert uapi.vfio_region_info.new(index=7).argsz == 32
    assert uapi.vfio_region_info.new(index=7).index == 7
