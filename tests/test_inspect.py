"""`medlens inspect` describes every input kind, exits 2 with the reason for what cannot be read, and names
zip members skipped for safety (also in prepare's notes and ask's envelope)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from dicom_factory import truncate, write_not_dicom, write_series
from PIL import Image
from scripted import ScriptedBackend

from medlens.io.describe import DESCRIBERS, describe
from medlens.io.discover import discover, unsafe_members


def _ct(folder, n=3):
    arrays = [np.full((16, 16), 1000 + 10 * i, np.int16) for i in range(n)]
    return write_series(folder, arrays, positions=[(0, 0, 2.0 * i) for i in range(n)])


def test_every_kind_has_a_describer():
    assert set(DESCRIBERS.names()) == {"dicom", "fhir", "nifti", "notes", "pdf", "raster", "slide"}


def test_dicom_series(tmp_path, cli):
    _ct(tmp_path / "ct")
    code, out, err = cli("inspect", tmp_path / "ct")
    assert code == 0, err
    assert "CT" in out and "[ok]" in out and "3" in out


@pytest.mark.parametrize("bad", ["truncated", "not_dicom"])
def test_an_unreadable_single_file_exits_2_with_the_reason(tmp_path, cli, bad):
    path = truncate(_ct(tmp_path / "ct", 1)[0], 0.3) if bad == "truncated" else write_not_dicom(tmp_path / "x.dcm")
    code, out, err = cli("inspect", path)
    assert code == 2 and out == ""
    assert str(path) in err and "skipped" not in err and "Traceback" not in err


def test_empty_folder_and_missing_path_exit_2(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    code, _, err = cli("inspect", tmp_path / "empty")
    assert code == 2 and "no files found" in err
    code, _, err = cli("inspect", tmp_path / "nowhere")
    assert code == 2 and "no such file" in err


def test_folder_of_only_unreadable_files_exits_2(tmp_path, cli):
    write_not_dicom(tmp_path / "junk" / "a.dcm")
    write_not_dicom(tmp_path / "junk" / "b.dcm")
    code, _, err = cli("inspect", tmp_path / "junk")
    assert code == 2 and "no readable images" in err and "2 file(s)" in err


def test_nifti_geometry(tmp_path, cli):
    import nibabel as nib

    affine = np.diag([-0.8, 0.9, 2.5, 1.0])  # LAS
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 24, 7), np.int16), affine), path)
    code, out, err = cli("inspect", path)
    assert code == 0, err
    assert "shape 20x24x7" in out and "0.8 x 0.9 x 2.5" in out and "orientation LAS" in out and "int16" in out


def test_truncated_nifti_exits_2(tmp_path, cli):
    import nibabel as nib

    path = tmp_path / "vol.nii"
    nib.save(nib.Nifti1Image(np.ones((32, 32, 16), np.float32), np.eye(4)), path)
    truncate(path, 0.5)
    code, _, err = cli("inspect", path)
    assert code == 2 and "vol.nii" in err


@pytest.mark.parametrize(("mode", "array", "bits"), [("L", np.zeros((30, 40), np.uint8), 8),
                                                     ("I;16", np.zeros((30, 40), np.uint16), 16),
                                                     ("RGB", np.zeros((30, 40, 3), np.uint8), 8)])  # fmt: skip
def test_raster_size_mode_bits(tmp_path, cli, mode, array, bits):
    path = tmp_path / "img.png"
    Image.fromarray(array).save(path)
    code, out, err = cli("inspect", path)
    assert code == 0, err
    assert "40x30 px" in out and f"{bits} bits" in out


def test_broken_png_exits_2(tmp_path, cli):
    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(path)
    truncate(path, 0.5)
    assert cli("inspect", path)[0] == 2


def test_pdf_pages(tmp_path, cli):
    from test_task_lab import PAGES, write_report

    path = tmp_path / "report.pdf"
    write_report(path)
    code, out, err = cli("inspect", path)
    assert code == 0, err
    assert f"{len(PAGES)} page(s), {len(PAGES)} with extractable text" in out
    assert "page 1: 595x842 pt (210x297 mm)" in out and "page 3: 842x595 pt" in out


def test_truncated_pdf_exits_2(tmp_path, cli):
    from test_task_lab import write_report

    path = tmp_path / "report.pdf"
    write_report(path)
    truncate(path, 0.6)
    code, _, err = cli("inspect", path)
    assert code == 2 and "report.pdf" in err


def test_fhir_counts_and_notes(tmp_path, cli):
    from test_task_ehr import bundle_dict

    data = bundle_dict()
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(data))
    expected = {}
    for entry in data["entry"]:
        rtype = entry["resource"]["resourceType"]
        expected[rtype] = expected.get(rtype, 0) + 1
    code, out, err = cli("inspect", path)
    assert code == 0, err
    assert f"{sum(expected.values())} resource(s)" in out
    for rtype, n in expected.items():
        assert f"  {rtype}: {n}\n" in out
    notes = tmp_path / "notes.txt"
    notes.write_text("intro\n2021-03-04 clinic visit\nwell\n2022-01-02 follow-up\nok\n")
    code, out, _ = cli("inspect", notes)
    assert code == 0 and "3 entries (2 dated, 1 undated)" in out


def test_not_a_bundle_exits_2(tmp_path, cli):
    path = tmp_path / "x.json"
    path.write_text('{"resourceType": "Patient"}')
    code, _, err = cli("inspect", path)
    assert code == 2 and "not a FHIR Bundle" in err


def _unsafe_zip(tmp_path):
    files = _ct(tmp_path / "ct")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in files:
            zf.write(f, f"ct/{f.name}")
        zf.writestr("../evil.dcm", files[0].read_bytes())
        zf.writestr("/abs/evil2.dcm", files[0].read_bytes())
        link = zipfile.ZipInfo("ct/link.dcm")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
    return archive


def test_unsafe_zip_members_are_skipped_and_named(tmp_path, cli):
    archive = _unsafe_zip(tmp_path)
    found = discover(archive)
    try:
        assert len(found.dicom) == 3  # the three safe members only
        assert [w.split("'")[1] for w in found.warnings] == ["../evil.dcm", "/abs/evil2.dcm", "ct/link.dcm"]
    finally:
        found.tempdir.cleanup()
    assert unsafe_members(archive) == found.warnings
    reasons = " ".join(found.warnings)
    assert "(..)" in reasons and "absolute path" in reasons and "symbolic link" in reasons
    code, out, err = cli("inspect", archive)
    assert code == 0 and "[ok]" in out
    assert "../evil.dcm" in err and "/abs/evil2.dcm" in err and "ct/link.dcm" in err
    code, _, err = cli("prepare", archive, "--out", tmp_path / "out")
    assert code == 0 and "../evil.dcm" in err and "ct/link.dcm" in err


def test_unsafe_zip_members_are_in_the_ask_envelope(tmp_path):
    from medlens.api import ask

    result = ask(_unsafe_zip(tmp_path), "What is shown?", ScriptedBackend("Final Answer: yes"))
    assert sum("for safety" in w for w in result["warnings"]) == 3


def test_describe_is_the_api_of_inspect(tmp_path):
    _ct(tmp_path / "ct")
    described = describe(tmp_path / "ct")
    assert described.kind == "dicom" and len(described.lines) == 1 and not described.warnings
