"""What a built wheel ships, from pyproject.toml's setuptools tables: every folder of the ``hf_cft`` package is a
declared package (setuptools warns, and may drop, a folder Python can import that the list leaves out), and every
file in it that is not Python matches its package's package-data patterns (else the wheel silently lacks it)."""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_folder_of_the_package_is_declared():
    packages = set(_setuptools()["packages"])
    folders = {
        ".".join(p.relative_to(ROOT).parts)
        for p in [ROOT / "hf_cft", *(ROOT / "hf_cft").rglob("*")]
        if p.is_dir() and p.name != "__pycache__" and any(f.is_file() for f in p.iterdir())
    }
    assert folders <= packages, sorted(folders - packages)


def test_every_data_file_matches_its_package_data():
    data = _setuptools()["package-data"]
    missing = []
    for f in (ROOT / "hf_cft").rglob("*"):
        if not f.is_file() or f.suffix in (".py", ".pyc") or "__pycache__" in f.parts:
            continue
        package = ".".join(f.parent.relative_to(ROOT).parts)
        if not any(fnmatch.fnmatch(f.name, pattern) for pattern in data.get(package, [])):
            missing.append(str(f.relative_to(ROOT)))
    assert not missing, missing
