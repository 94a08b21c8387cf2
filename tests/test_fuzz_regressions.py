"""Fuzz smoke runs (each target briefly, bounded executions) and the crashers the fuzzers found."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_radiograph
from fuzz.engine import run_mutations
from fuzz.targets import TARGETS

from medlens.errors import MedlensError

pytestmark = pytest.mark.fuzz


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_smoke(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeds and a few hundred mutants of each target end in a result or a typed error (at most ~2 s)."""
    monkeypatch.setenv("MEDLENS_MAX_DECODED_MB", "512")
    target = TARGETS[name]
    seeds = target.seeds()
    assert seeds, f"{name} has no seeds"
    start = time.monotonic()
    execs, findings = run_mutations(target, seeds, seconds=2.0, timeout=5.0, max_execs=300, seed=1)
    assert execs >= len(seeds)
    assert not findings, findings
    assert time.monotonic() - start < 10


def _radiograph(tmp_path: Path) -> Path:
    return write_radiograph(tmp_path / "dx.dcm", np.arange(24 * 20, dtype=np.uint16).reshape(24, 20))


def test_transfer_syntax_that_is_not_one_is_a_typed_error(tmp_path: Path) -> None:
    """Found by the dicom_header fuzzer: a TransferSyntaxUID that is some other UID raised ValueError."""
    path = _radiograph(tmp_path)
    data = path.read_bytes()
    ts = b"1.2.840.10008.1.2.1\x00"
    assert ts in data
    path.write_bytes(data.replace(ts, b"1.2.840.10008.5.1.4.1.1.1\x00"[: len(ts)].ljust(len(ts), b"\x00"), 1))
    with pytest.raises(MedlensError):
        TARGETS["dicom_header"].run(path.read_bytes())


def test_unknown_value_representation_is_a_typed_error(tmp_path: Path) -> None:
    """Found by the dicom_header fuzzer: an unknown VR (Modality tagged 'H\\x0c') raised NotImplementedError."""
    path = _radiograph(tmp_path)
    data = path.read_bytes()
    modality = b"\x08\x00\x60\x00CS"
    assert modality in data
    mangled = data.replace(modality, b"\x08\x00\x60\x00H\x0c", 1)
    with pytest.raises(MedlensError):
        TARGETS["dicom_header"].run(mangled)


def test_nifti_with_an_empty_axis_is_a_typed_error(tmp_path: Path) -> None:
    """Found by the nifti fuzzer: a header with a zero-length axis raised IndexError (empty volume)."""
    import nibabel as nib

    from medlens.errors import CorruptFileError
    from medlens.io.discover import FoundFile
    from medlens.io.nifti import read_nifti

    path = tmp_path / "empty.nii"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 0), np.int16), np.eye(4)), path)
    with pytest.raises(CorruptFileError, match="without voxels"):
        read_nifti(FoundFile(path, "empty.nii"))


def test_damaged_deflate_member_is_a_typed_error(tmp_path: Path) -> None:
    """Found by the zip fuzzer: a damaged deflate stream in a member raised zlib.error from discover."""
    import zipfile

    from medlens.io.discover import discover

    path = tmp_path / "study.zip"
    payload = bytes(np.random.default_rng(0).integers(0, 8, 4096, dtype=np.uint8))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ct1.dcm", payload)
    data = bytearray(path.read_bytes())
    start = 30 + len("ct1.dcm")  # local header, then the compressed stream
    data[start + 20 : start + 60] = b"\xff" * 40
    path.write_bytes(bytes(data))
    with pytest.raises(MedlensError):
        found = discover(path)
        if found.tempdir is not None:
            found.tempdir.cleanup()
