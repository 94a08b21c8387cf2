"""DICOM SR out (medlens.results.sr): qa, yes/no and localize results as Comprehensive 3D SR TID 1500,
checked with dciodvfy (dicom3tools), dsrdump (dcmtk) and read back with highdicom."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_factory import write_radiograph, write_series
from medlens_server import LOCALIZE_ANSWER
from scripted import ScriptedBackend

from medlens import DISCLAIMER
from medlens.errors import OutputFolderError
from medlens.results import DicomSourcesNeededError, build_sr, write_outputs, write_sr
from medlens.results.sr import CONCLUSION_CODE, SERIES_DESCRIPTION, YES_NO_CODES
from medlens.tasks import get_task
from medlens.tasks.runner import run_task

QUESTION = "Is there a pulmonary nodule?"


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ct")
    rng = np.random.default_rng(13)
    write_series(folder, [rng.integers(0, 2000, (32, 32), dtype=np.uint16) for _ in range(6)])
    return folder


@pytest.fixture(scope="module")
def cxr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cxr") / "cxr.dcm"
    return write_radiograph(path, (np.arange(300 * 200).reshape(300, 200) % 4000).astype(np.uint16))


def _qa(ct: Path, answer: str, question: str = QUESTION) -> dict:
    return run_task(get_task("qa"), [ct], question, ScriptedBackend(answer)).model_dump()


def _localize(cxr: Path) -> dict:
    return run_task(get_task("localize"), [cxr], None, ScriptedBackend(LOCALIZE_ANSWER)).model_dump()


@pytest.fixture(scope="module")
def sr_files(ct: Path, cxr: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One SR of each kind: a free qa answer, a yes/no answer, localize boxes."""
    out = tmp_path_factory.mktemp("sr")
    return {
        "qa": write_sr(out / "qa.dcm", _qa(ct, "A small opacity."), [ct], question=QUESTION),
        "yes-no": write_sr(out / "yn.dcm", _qa(ct, "Final Answer: yes"), [ct], question=QUESTION),
        "localize": write_sr(out / "loc.dcm", _localize(cxr), [cxr]),
    }


KINDS = ["qa", "yes-no", "localize"]


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dciodvfy (Debian dicom3tools) is not installed")
@pytest.mark.parametrize("kind", KINDS)
def test_dciodvfy_reports_no_error(sr_files: dict[str, Path], kind: str):
    run = subprocess.run(["dciodvfy", str(sr_files[kind])], capture_output=True, text=True, timeout=30)
    output = run.stdout + run.stderr
    assert "Comprehensive3DSR" in output  # it recognised the IOD
    errors = [line for line in output.splitlines() if "Error" in line]
    assert not errors, errors


@pytest.mark.skipif(not shutil.which("dsrdump"), reason="dsrdump (dcmtk) is not installed")
@pytest.mark.parametrize("kind", KINDS)
def test_dsrdump_reads_it(sr_files: dict[str, Path], kind: str):
    run = subprocess.run(["dsrdump", str(sr_files[kind])], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert "Imaging Measurement Report" in run.stdout and "Research use only" in run.stdout


def _texts(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> dict[str, str]:
    return {
        item.name.meaning: item.value
        for item in group[0].ContentSequence
        if item.value_type == hd.sr.ValueTypeValues.TEXT
    }


def _answer_group(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    (group,) = sr.content.get_image_measurement_groups()
    return group


def test_qa_answer_sr_in_the_source_study(ct: Path, tmp_path: Path):
    envelope = _qa(ct, "The lungs show a small irregular opacity in the right upper lobe.")
    path = write_sr(tmp_path / "qa.dcm", envelope, [ct], question=QUESTION)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(ct.glob("*.dcm"))]
    sr = hd.sr.srread(path)
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
    assert sr.SeriesDescription == SERIES_DESCRIPTION
    group = _answer_group(sr)
    texts = _texts(group)
    assert texts["Request"] == QUESTION
    assert texts["Finding"] == envelope["answer"]
    assert texts["Comment"] == DISCLAIMER
    assert not group.get_qualitative_evaluations()
    referenced = {ref.referenced_sop_instance_uid for ref in group.source_images}
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {s.SOPInstanceUID for s in sources}
    assert referenced <= evidence
    (observer,) = [
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Device Observer Model Name"
    ]
    assert observer.TextValue == "scripted"


@pytest.mark.parametrize(
    ("answer", "expected"), [("Yes, a nodule.\nFinal Answer: yes", "yes"), ("Final Answer: no", "no")]
)
def test_yes_no_answer_is_a_coded_conclusion(ct: Path, tmp_path: Path, answer: str, expected: str):
    envelope = _qa(ct, answer)
    assert envelope["final_answer"] == expected
    path = write_sr(tmp_path / "yn.dcm", envelope, [ct], question=QUESTION)
    group = _answer_group(hd.sr.srread(path))
    (code,) = group.get_qualitative_evaluations()
    assert code.name.value == CONCLUSION_CODE[0]
    assert (code.value.value, code.value.scheme_designator) == YES_NO_CODES[expected][:2]


def test_localize_boxes_are_planar_rois_on_the_radiograph(cxr: Path, tmp_path: Path):
    envelope = _localize(cxr)
    path = write_sr(tmp_path / "loc.dcm", envelope, [cxr], question="Locate the lungs and the heart.")
    source = pydicom.dcmread(cxr, stop_before_pixels=True)
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    boxes = envelope["payload"]["boxes"]
    assert [str(g.tracking_identifier) for g in groups] == [b["label"] for b in boxes]
    for group, box in zip(groups, boxes, strict=True):
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        x0, y0, x1, y1 = box["box_px"]
        assert np.array_equal(region.value, [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
        (ref,) = region.ContentSequence
        assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ref.ReferencedSOPSequence[0].ReferencedSOPClassUID == source.SOPClassUID


def test_boxes_of_a_resized_image_are_scaled_to_the_source_grid(cxr: Path):
    envelope = _localize(cxr)
    envelope["payload"]["image_size"] = [100, 150]  # as if the model's image had been halved
    sr = build_sr(envelope, [cxr])
    groups = hd.sr.srread(_roundtrip(sr)).content.get_planar_roi_measurement_groups()
    x0, y0, x1, y1 = envelope["payload"]["boxes"][0]["box_px"]
    assert np.array_equal(groups[0].roi.value[0], [2 * x0, 2 * y0])
    assert np.array_equal(groups[0].roi.value[2], [2 * x1, 2 * y1])


def _roundtrip(sr: pydicom.Dataset) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def test_non_dicom_input_has_no_study_to_join(tmp_path: Path):
    from PIL import Image

    png = tmp_path / "cxr.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(png)
    envelope = run_task(get_task("qa"), [png], QUESTION, ScriptedBackend("no")).model_dump()
    with pytest.raises(DicomSourcesNeededError, match="no DICOM instance") as info:
        build_sr(envelope, [png])
    assert info.value.path == str(png)


def test_sources_of_another_series_are_refused(ct: Path, cxr: Path):
    envelope = _qa(ct, "Final Answer: yes")
    with pytest.raises(DicomSourcesNeededError, match="series"):
        build_sr(envelope, [cxr])


def test_write_outputs_writes_both_and_links_them(cxr: Path, tmp_path: Path):
    import json

    envelope = _localize(cxr)
    sr_path, fhir_path = write_outputs(envelope, [cxr], tmp_path / "r.dcm", tmp_path / "r.json", question="Locate")
    sr = pydicom.dcmread(sr_path)
    bundle = json.loads(fhir_path.read_text())
    report = bundle["entry"][0]["resource"]
    assert report["identifier"][0]["value"] == f"urn:oid:{sr.SOPInstanceUID}"
    assert len(report["result"]) == 1 + len(envelope["payload"]["boxes"])
    with pytest.raises(OutputFolderError, match="cannot write"):
        write_outputs(envelope, [cxr], fhir_path / "under-a-file" / "r.dcm")  # a missing folder is made; this cannot be


@pytest.fixture(scope="module")
def dicom_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slide_factory import write_dicom_wsi

    folder = tmp_path_factory.mktemp("wsi") / "slide"
    write_dicom_wsi(folder, width=3072, height=2048, downsamples=(1, 4, 16))
    return folder


def test_slide_patches_are_regions_on_level_0(dicom_slide: Path, tmp_path: Path):
    from medlens.prep.slide_recipe import SlideOptions
    from medlens.tasks import TaskOptions

    options = TaskOptions(slide=SlideOptions(min_tissue=0.2, workers=0))
    backend = ScriptedBackend("Final Answer: no")
    envelope = run_task(get_task("qa"), [dicom_slide], "Tumour?", backend, options).model_dump()
    patches = envelope["details"]["patches"]
    assert patches
    path = write_sr(tmp_path / "wsi.dcm", envelope, [dicom_slide])
    sr = hd.sr.srread(path)
    level0 = pydicom.dcmread(dicom_slide / "level-0.dcm", stop_before_pixels=True)
    label = pydicom.dcmread(dicom_slide / "label.dcm", stop_before_pixels=True)
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {level0.SOPInstanceUID}  # never the label (it may show the patient's name)
    assert label.SOPInstanceUID not in evidence
    groups = sr.content.get_planar_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == [f"patch {i + 1}" for i in range(len(patches))]
    for group, patch in zip(groups, patches, strict=True):
        assert group.roi.frame_of_reference_uid == level0.FrameOfReferenceUID
        x0, y0 = patch["x0_y0"]
        size = patch["size_level0"]
        expected = [_slide_mm(level0, x0, y0), _slide_mm(level0, x0 + size, y0 + size)]
        assert np.allclose(np.asarray(group.roi.value)[[0, 2]], expected, atol=1e-4)
    if shutil.which("dciodvfy"):
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=30)
        assert not [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def _slide_mm(ds: pydicom.Dataset, column: float, row: float) -> list[float]:
    """Slide coordinates (mm) of an image point (pixel edges; the origin is the first pixel's centre)."""
    origin = ds.TotalPixelMatrixOriginSequence[0]
    along_row, along_column = np.array(ds.ImageOrientationSlide[:3]), np.array(ds.ImageOrientationSlide[3:])
    spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    start = np.array([origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem, 0.0])
    point = start + along_row * (column - 0.5) * spacing[1] + along_column * (row - 0.5) * spacing[0]
    return point.tolist()


def test_non_dicom_slide_has_no_study_to_join(tmp_path: Path):
    from slide_factory import write_svs

    svs = tmp_path / "slide.svs"
    write_svs(svs, width=1024, height=768, downsamples=(1, 4))
    envelope = {"task": "qa", "model": "m", "answer": "no", "details": {"family": "wsi", "patches": []}}
    with pytest.raises(DicomSourcesNeededError, match="no DICOM instance"):
        build_sr(envelope, [svs])


def test_ask_writes_the_sr_and_the_fhir_bundle(ct: Path, cxr: Path, tmp_path: Path, cli) -> None:
    import json

    sr_path, fhir_path = tmp_path / "out" / "result.dcm", tmp_path / "out" / "result.json"
    code, out, err = cli(
        "ask", ct, "-Q", QUESTION, "--model", "test-tiny", "--sr-out", sr_path, "--fhir-out", fhir_path, "-q"
    )
    assert code == 0, err
    envelope = json.loads(out)
    assert envelope["question"] == QUESTION and envelope["model_fingerprint"]
    sr = hd.sr.srread(sr_path)
    source = pydicom.dcmread(next(p for p in sorted(ct.rglob("*")) if p.is_file()), stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
    bundle = json.loads(fhir_path.read_text())
    assert bundle["resourceType"] == "Bundle"
    png = tmp_path / "cxr.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(png)
    code, _, err = cli("ask", png, "-Q", QUESTION, "--model", "test-tiny", "--sr-out", tmp_path / "x.dcm", "-q")
    assert code == 2 and "cxr.png" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.dcm").exists()


def test_sr_references_only_the_slices_sent(tmp_path: Path):
    """A 100-slice CT: medgemma-1.5 sends 85 slices; the SR's source images and evidence are those 85
    (``details.instances_sent``, hashed, as tasks/study.py records them), and it still validates."""
    from medlens.prep import prepare_study
    from medlens.privacy import short_hash
    from medlens.results.sr import SENT_KEY

    ct100 = tmp_path / "ct100"
    rng = np.random.default_rng(5)
    write_series(ct100, [rng.integers(0, 2000, (16, 16), dtype=np.uint16) for _ in range(100)])
    prepared = prepare_study(ct100)
    sent = {s.sop_instance_uid for s in prepared.slices}
    assert len(sent) == 85
    envelope = _qa(ct100, "Final Answer: no")
    envelope["details"][SENT_KEY] = [{"sop": short_hash(s.sop_instance_uid), "frame": s.frame} for s in prepared.slices]
    path = write_sr(tmp_path / "sent.dcm", envelope, [ct100], question=QUESTION)
    sr = hd.sr.srread(path)
    referenced = {ref.referenced_sop_instance_uid for ref in _answer_group(sr).source_images}
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == evidence == sent
    if shutil.which("dciodvfy"):
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=30)
        assert not [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
    if shutil.which("dsrdump"):
        assert subprocess.run(["dsrdump", str(path)], capture_output=True, timeout=30).returncode == 0
    envelope["details"][SENT_KEY].append({"sop": "0000000000", "frame": None})
    with pytest.raises(DicomSourcesNeededError, match="1 of the 86 instances sent to the model"):
        build_sr(envelope, [ct100], question=QUESTION)
