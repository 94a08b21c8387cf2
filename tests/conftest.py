"""Shared test set-up: a private model cache, the offline DICOM test corpora, an in-process CLI runner."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Every test and every CLI subprocess builds test-tiny into a throw-away cache, never the user's home.
_CACHE = tempfile.mkdtemp(prefix="medlens-test-cache-")
os.environ.setdefault("MEDLENS_CACHE", _CACHE)
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def pydicom_test_dir() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


def pydicom_data_dir() -> Path | None:
    """Files of the ``pydicom-data`` package (read straight from disk: pydicom's own lookup may try to
    download when its hashes disagree with the installed data)."""
    try:
        import data_store
    except ImportError:
        return None
    return Path(data_store.__file__).parent / "data"


@pytest.fixture
def pydicom_file():
    """Path of a named file from pydicom's test files or the pydicom-data package."""

    def find(name: str) -> Path:
        for root in (pydicom_test_dir(), pydicom_data_dir()):
            if root is not None and (root / name).exists():
                return root / name
        pytest.skip(f"{name} not installed (pydicom-data missing)")

    return find


@pytest.fixture
def cli(capsys):
    """Run ``medlens ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from medlens.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def tiny_backend():
    """The built-in test-tiny model, loaded once for the whole session."""
    pytest.importorskip("torch")
    from medlens.backends import load_backend

    backend = load_backend("test-tiny")
    yield backend
    backend.close()
