"""Fuzz targets: one per reader or parser, each with its seeds (generated in code or taken from the corpora).

A target's ``run(data)`` feeds one input to medlens. The property every target checks: the input ends in a
result or in one of the target's ``allowed`` exceptions (typed medlens errors; ``ParseError`` for the task
parsers), never another exception. Hangs and memory are bounded by the engine (see ``tests.fuzz.engine``).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlens.errors import MedlensError

#: seeds larger than this are left out (mutating megabytes is slow and finds nothing new)
MAX_SEED_BYTES = 256 * 1024


@dataclass(frozen=True)
class Target:
    """A fuzz target: ``run`` one input; ``seeds`` builds the starting corpus; ``allowed`` the typed errors."""

    name: str
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    allowed: Callable[[], tuple[type[BaseException], ...]]


def _medlens_errors() -> tuple[type[BaseException], ...]:
    return (MedlensError,)


def _parser_errors() -> tuple[type[BaseException], ...]:
    from medlens.tasks.base import ParseError

    return (MedlensError, ParseError)


def _no_errors() -> tuple[type[BaseException], ...]:
    return ()


# ---------------------------------------------------------------------------------------------- scratch files

_SCRATCH: Path | None = None


def scratch(name: str, data: bytes) -> Path:
    """Write ``data`` to a per-process scratch file called ``name`` (the suffix decides the reader)."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = Path(tempfile.mkdtemp(prefix="medlens-fuzz-"))
    path = _SCRATCH / name
    path.write_bytes(data)
    return path


def _seed_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="medlens-fuzz-seed-"))


def _small(blobs: list[bytes]) -> list[bytes]:
    return [b for b in blobs if 0 < len(b) <= MAX_SEED_BYTES]


# ---------------------------------------------------------------------------------------------- DICOM


def _dicom_seeds() -> list[bytes]:
    import dicom_factory as df
    import pydicom

    out = _seed_dir()
    rng = np.random.default_rng(0)
    ct = [rng.integers(0, 2000, (16, 16), dtype=np.uint16) for _ in range(2)]
    written = list(df.write_series(out / "ct", ct))
    written.append(df.write_radiograph(out / "dx.dcm", rng.integers(0, 4000, (24, 20), dtype=np.uint16)))
    written.append(df.write_enhanced(out / "mf.dcm", rng.integers(0, 2000, (3, 16, 16), dtype=np.uint16)))
    written.append(df.write_non_image(out / "sr.dcm"))
    blobs = [Path(p).read_bytes() for p in written if Path(p).is_file()]
    corpus = Path(pydicom.__file__).parent / "data" / "test_files"
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtdose.dcm", "emri_small.dcm", "SC_rgb.dcm",
                 "RLE_16_1_1F.dcm", "liver_1frame.dcm", "JPEG-lossy.dcm", "image_dfl.dcm", "no_meta.dcm"):  # fmt: skip
        if (corpus / name).is_file():
            blobs.append((corpus / name).read_bytes())
    return _small(blobs)


def _dicom_header(data: bytes) -> None:
    from medlens.io.dicom_header import read_instance

    read_instance(scratch("input.dcm", data), "input.dcm")


def _dicom_pixels(data: bytes) -> None:
    from medlens.io.dicom_header import read_instance
    from medlens.io.dicom_pixels import FrameEntry, decode, read_native_frame

    inst = read_instance(scratch("input.dcm", data), "input.dcm")
    read_native_frame(inst)
    entries = [FrameEntry(inst, k if inst.n_frames > 1 else None, g) for k, g in enumerate(inst.frames[:2])]
    if entries:
        decode(entries, color=inst.is_color)


# ---------------------------------------------------------------------------------------------- NIfTI


def _nifti_seeds() -> list[bytes]:
    import nibabel as nib

    rng = np.random.default_rng(1)
    blobs = []
    for shape, dtype, affine in (
        ((16, 16, 3), np.int16, np.diag([0.8, 0.8, 2.5, 1.0])),
        ((20, 18), np.float32, np.eye(4)),
        ((16, 16, 2, 1), np.uint8, np.array([[0, 0, 1, 0], [0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])),
    ):
        img = nib.Nifti1Image(rng.integers(-100, 100, shape).astype(dtype), affine)
        blobs.append(img.to_bytes())
    img2 = nib.Nifti2Image(rng.normal(size=(16, 16, 2)).astype(np.float64), np.eye(4))
    blobs.append(img2.to_bytes())
    return blobs


def _nifti(data: bytes) -> None:
    from medlens.io.discover import FoundFile
    from medlens.io.nifti import read_nifti

    path = scratch("input.nii", data)
    stack = read_nifti(FoundFile(path, "input.nii"))
    stack.load([0])


# ---------------------------------------------------------------------------------------------- PDF


def _pdf_seeds() -> list[bytes]:
    from fpdf import FPDF

    blobs = []
    for pages, fmt in ((1, "A4"), (2, (40, 30))):
        pdf = FPDF(format=fmt)
        pdf.set_font("helvetica", size=10)
        for k in range(pages):
            pdf.add_page()
            pdf.cell(20, 8, f"Haemoglobin {130 + k} g/L")
            pdf.rect(5, 15, 20, 10)
        blobs.append(bytes(pdf.output()))
    return blobs


def _pdf(data: bytes) -> None:
    from medlens.io.pdf import render_pdf

    render_pdf(scratch("input.pdf", data), dpi=20, max_pages=4)


# ---------------------------------------------------------------------------------------------- FHIR and notes


def _fhir_seeds() -> list[bytes]:
    patient = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-02-03"}
    entries = [
        patient,
        {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
         "code": {"text": "Type 2 diabetes"}, "onsetDateTime": "2015-04-01",
         "clinicalStatus": {"coding": [{"code": "active"}]}},
        {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "HbA1c"},
         "valueQuantity": {"value": 7.1, "unit": "%"}, "effectiveDateTime": "2021-03-04T10:00:00Z",
         "referenceRange": [{"low": {"value": 4}, "high": {"value": 6}}]},
        {"resourceType": "Medication", "id": "m1", "code": {"text": "metformin"}},
        {"resourceType": "MedicationRequest", "id": "mr1", "status": "active", "intent": "order",
         "subject": {"reference": "Patient/p1"}, "medicationReference": {"reference": "Medication/m1"},
         "dosageInstruction": [{"text": "500 mg twice daily"}], "authoredOn": "2021-03-04"},
        {"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"},
         "period": {"start": "2021-03-04"}, "reasonCode": [{"text": "review"}]},
        {"resourceType": "AllergyIntolerance", "id": "a1", "patient": {"reference": "Patient/p1"},
         "code": {"text": "penicillin"}},
        {"resourceType": "DocumentReference", "id": "d1", "status": "current",
         "content": [{"attachment": {"contentType": "text/plain", "data": "Tm90ZSB0ZXh0"}}]},
    ]  # fmt: skip
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in entries]}
    notes = "Intro line\n2021-03-04 Clinic\nSeen today.\n## 2021/05/06 10:30 Ward\nStable.\nDate: 2022-01-02\nOK\n"
    return [json.dumps(bundle).encode(), json.dumps({"resourceType": "Patient"}).encode(), b"\x00" + notes.encode()]


def _fhir(data: bytes) -> None:
    from medlens.io.fhir import read_bundle, read_notes

    if data[:1] == b"\x00":  # the first byte picks the reader: notes or a bundle
        read_notes(scratch("input.txt", data[1:]))
    else:
        read_bundle(scratch("input.json", data))


# ---------------------------------------------------------------------------------------------- zip


def _zip_seeds() -> list[bytes]:
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)).save(png, format="PNG")
    dicom = _dicom_seeds()[0]
    blobs = []
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", method) as zf:
            zf.writestr("study/img.png", png.getvalue())
            zf.writestr("study/ct1.dcm", dicom)
            zf.writestr("../evil.dcm", dicom)
            zf.writestr("/abs/notes.txt", b"hello")
            link = zipfile.ZipInfo("study/link")
            link.external_attr = (0o120777 << 16) | 0
            zf.writestr(link, "../../etc/passwd")
        blobs.append(buf.getvalue())
    return blobs


def _zip(data: bytes) -> None:
    from medlens.io.discover import discover

    found = discover(scratch("input.zip", data))
    if found.tempdir is not None:
        found.tempdir.cleanup()


# ---------------------------------------------------------------------------------------------- slides


def _slide_seeds() -> list[bytes]:
    import slide_factory as sf

    out = _seed_dir()
    small = {"width": 512, "height": 384, "downsamples": (1, 4), "tile": 128, "quality": 60}
    sf.write_svs(out / "a.svs", label=False, macro=False, **small)
    sf.write_generic_tiff(out / "b.tif", **small)
    return _small([(out / n).read_bytes() for n in ("a.svs", "b.tif")])


def _slide(data: bytes) -> None:
    from medlens.io.slide import open_slide

    # first byte: which suffix the file gets (SVS or generic TIFF readers)
    name = "input.svs" if data[:1] != b"\x01" else "input.tif"
    with open_slide(scratch(name, data[1:] if data[:1] == b"\x01" else data)) as slide:
        width, height = slide.dimensions
        slide.read(max(0, width // 2 - 32), max(0, height // 2 - 32), 0, 64, 64)
        slide.read(0, 0, len(slide.levels) - 1, 48, 48)
        slide.summary()


# ---------------------------------------------------------------------------------------------- text parsers


_OUTPUTS = [
    '```json\n[{"box_2d": [100, 200, 300, 400], "label": "heart"}]\n```',
    '{"boxes": [{"box_2d": "0.1, 0.2, 0.3, 0.4", "label": "left lung"}, {"bbox": [1, 2]}]}',
    '{"heart": [10, 20, 30, 40], "aorta": [5, 6, 7, 8]}',
    '<unused94>thought\nlooking<unused95>[{"box_2d": [900, 10, 1200, 5], "label": "x"}, {"box_2d": [1, 2, 3',
    '```json\n{"tests": [{"test_name": "Hb", "value": 13.1, "unit": "g/dL", "range": [12, 16],'
    ' "sample_collection_time": "2021-03-04T10:00"}], "panel": "CBC"}\n```',
    '[{"name": "Na", "result": "140", "reference_range": {"low": 135, "high": 145}}, {"name": "K", "res',
    '{"Haematology": [{"name": "WBC", "value": "6.1"}], "Chemistry": [{"name": "Cr", "value": 80}]}',
    "Final Answer: yes",
    "The answer is (B).\nA. one\nB. two",
    "<unused94>thought\nhmm",
]


def _text_seeds() -> list[bytes]:
    return [s.encode() for s in _OUTPUTS]


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _localize(data: bytes) -> None:
    from medlens.prep.boxes import iou, mean_iou
    from medlens.tasks.localize import LocalizeTask

    text = _text(data)
    size = 64 + data[0] * 7 if data else 512
    parsed = LocalizeTask().parse(text, {"image_size": [size, 512]})
    boxes = parsed.payload["boxes"]
    for key in ("box_2d", "box_px"):
        score = mean_iou(boxes, boxes, key=key)
        assert 0.0 <= score <= 1.0 + 1e-9, score
    assert all(0.0 <= iou(b["box_2d"], boxes[0]["box_2d"]) <= 1.0 + 1e-9 for b in boxes)


def _lab(data: bytes) -> None:
    from medlens.tasks.lab import parse_tests, to_csv

    tests, warnings = parse_tests(_text(data))
    assert all(isinstance(w, str) for w in warnings)
    to_csv({"tests": [t.model_dump() for t in tests]})


def _prompts(data: bytes) -> None:
    from medlens.prompts import parsers

    text = _text(data)
    half = len(text) // 2
    split = parsers.split_thinking(text)
    assert isinstance(split.answer, str)
    assert parsers.parse_yes_no(text) in (None, "yes", "no")
    letters = parsers.option_letters(text[:half])
    choice = parsers.parse_choice(text[half:], letters or "ABCD")
    assert choice is None or choice in (letters or "ABCD")
    parsers.auto_final_answer(text[half:], text[:half])


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("dicom_header", _dicom_header, _dicom_seeds, _medlens_errors),
        Target("dicom_pixels", _dicom_pixels, _dicom_seeds, _medlens_errors),
        Target("nifti", _nifti, _nifti_seeds, _medlens_errors),
        Target("pdf", _pdf, _pdf_seeds, _medlens_errors),
        Target("fhir", _fhir, _fhir_seeds, _medlens_errors),
        Target("zip", _zip, _zip_seeds, _medlens_errors),
        Target("slide", _slide, _slide_seeds, _medlens_errors),
        Target("localize", _localize, _text_seeds, _parser_errors),
        Target("lab", _lab, _text_seeds, _parser_errors),
        Target("prompts", _prompts, _text_seeds, _no_errors),
    )
}


def check_one(target: Target, data: bytes) -> None:
    """Run one input; an allowed (typed) error is a pass, anything else propagates as a finding."""
    try:
        target.run(data)
    except target.allowed():
        pass


def seed_env() -> None:
    """A small decoded-pixel budget, so a header that asks for gigabytes must be refused before decoding."""
    os.environ.setdefault("MEDLENS_MAX_DECODED_MB", "512")
