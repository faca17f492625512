"""What an installed nemoq needs at run time ships in the wheel: kernel sources and the corpus."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")   # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DATA = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]


def shipped(package: str, path: Path) -> bool:
    return any(fnmatch.fnmatch(path.name, pattern) for pattern in PACKAGE_DATA.get(package, ()))


@pytest.mark.parametrize("package,suffixes", [
    ("nemoq.kernels_c", (".c", ".h", ".cu", ".cuh")),        # compiled on the user's machine
    ("nemoq.calib.corpus", (".jsonl", ".txt")),              # calibrate's default data
])
def test_runtime_files_are_package_data(package, suffixes):
    folder = ROOT / package.replace(".", "/")
    files = [p for p in folder.iterdir() if p.suffix in suffixes]
    assert files
    assert [p.name for p in files if not shipped(package, p)] == []
