"""A batch manifest of twelve small synthetic studies (CT series, chest X-rays, a PNG, a slide, a lab-report PDF)
with one corrupt file and one series whose decoder hangs, and the test stages that install that decoder where
the rows are prepared (in this process, or in Ray's workers, which import this module by name)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dicom_factory import truncate, write_radiograph, write_series
from PIL import Image
from pydicom.uid import RLELossless

from medlens.batch.stages import BatchStages
from medlens.pipeline import Unit

#: the decode pool's time limit for the hanging decoder in the tests (seconds)
HANG_LIMIT_S = 2.0
#: the rows that fail and why
FAILING = {"ct-hang": ("CorruptFileError", "timed out"), "corrupt": ("CorruptFileError", "")}


def install_faulty_decoder() -> None:
    """RLE frames decode through tests/decode_faults.py (which hangs on files named ``hang-*``) in this
    process's decode pool."""
    from medlens.io.dicom_pixels import PIXEL_DECODERS

    PIXEL_DECODERS[str(RLELossless)] = "decode_faults:faulty"


@dataclass(frozen=True)
class FaultyDecoderStages(BatchStages):
    """:class:`BatchStages` whose preparation decodes RLE with the faulty test decoder under a short time limit,
    wherever it runs."""

    def prepare(self, unit: Unit):
        from medlens.io import worker_pool

        install_faulty_decoder()
        with worker_pool.time_limit(HANG_LIMIT_S):
            return super().prepare(unit)


def _ct(folder: Path, seed: int, n: int = 5, prefix: str = "", rle: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    slices = [rng.integers(0, 2000, (24, 24)).astype(np.int16) for _ in range(n)]
    names = [f"{prefix}{i + 1:04d}.dcm" for i in range(n)]
    syntax = {"transfer_syntax": RLELossless} if rle else {}
    write_series(folder, slices, slice_thickness=2.0, filenames=names, **syntax)
    return folder


def _xray(path: Path, seed: int, modality: str = "DX") -> Path:
    rng = np.random.default_rng(seed)
    extra = {"PatientID": "BATCH-TEST-1", "PatientName": "Test^Batch"}
    return write_radiograph(path, rng.integers(0, 4000, (48, 40)).astype(np.uint16), modality=modality, extra=extra)


def _pdf(path: Path) -> Path:
    from fpdf import FPDF

    pdf = FPDF(format=(80, 50))
    pdf.add_page()
    pdf.set_font("helvetica", size=9)
    for line in ("Haemoglobin 13.1 g/dL (12.0-16.0)", "Sodium 140 mmol/L (135-145)"):
        pdf.cell(text=line, new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))
    return path


def write_studies(root: Path) -> dict[str, Path]:
    """The studies under ``root/studies``, by name."""
    from slide_factory import write_svs

    studies = root / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    made = {
        "ct": _ct(studies / "ct", 1),
        "ct-rle": _ct(studies / "ct-rle", 2, rle=True),
        "ct-hang": _ct(studies / "ct-hang", 3, n=3, prefix="hang-", rle=True),
        "dx": _xray(studies / "dx.dcm", 4),
        "cr": _xray(studies / "cr.dcm", 5, modality="CR"),
        "pdf": _pdf(studies / "labs.pdf"),
    }
    png = studies / "photo.png"
    Image.fromarray(np.random.default_rng(6).integers(0, 255, (40, 40, 3)).astype(np.uint8)).save(png)
    made["png"] = png
    made["slide"] = write_svs(studies / "slide.svs", width=4096, height=3072, downsamples=(1, 4)).path
    corrupt = studies / "corrupt.dcm"
    truncate(made["dx"], 0.4, corrupt)
    made["corrupt"] = corrupt
    return made


def manifest_rows(root: Path) -> list[dict]:
    """Twelve rows, paths relative to ``root`` (where the manifest lives): ten answer, two fail."""
    write_studies(root)
    s = "studies"
    return [
        {"id": "ct-q1", "input": f"{s}/ct", "question": "Is there a lung nodule?"},
        {"id": "ct-q2", "input": f"{s}/ct", "question": "Is there a pleural effusion?"},
        {"id": "ct-rle", "input": f"{s}/ct-rle", "question": "Is the liver normal?"},
        {"id": "ct-hang", "input": f"{s}/ct-hang", "question": "Is there a fracture?"},
        {"id": "dx", "input": f"{s}/dx.dcm", "question": "Is there a pneumothorax?"},
        {"id": "cr-report", "input": f"{s}/cr.dcm", "task": "report"},
        {"id": "dx-localize", "input": f"{s}/dx.dcm", "task": "localize", "question": "the heart"},
        {
            "id": "compare",
            "inputs": [f"{s}/dx.dcm", f"{s}/cr.dcm"],
            "task": "compare",
            "options": {"allow_different_patients": True},
        },
        {"id": "png", "input": f"{s}/photo.png", "question": "What is shown?", "options": {"modality": "XC"}},
        {
            "id": "slide",
            "input": f"{s}/slide.svs",
            "question": "Is there tumour?",
            "options": {"slide": {"max_patches": 3}},
        },
        {"id": "labs", "input": f"{s}/labs.pdf", "task": "lab-extract", "options": {"dpi": 50}},
        {"id": "corrupt", "input": f"{s}/corrupt.dcm", "question": "Is there a pneumothorax?"},
    ]


def write_manifest(root: Path, rows: list[dict] | None = None, name: str = "manifest.jsonl") -> Path:
    """``rows`` (default :func:`manifest_rows`) as a JSONL manifest in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rows = manifest_rows(root) if rows is None else rows
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def without_timings(envelope: dict) -> dict:
    """An envelope without what differs between runs of the same row: the timings."""
    return {k: v for k, v in envelope.items() if k != "timings"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
