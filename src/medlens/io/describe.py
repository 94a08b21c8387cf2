"""What ``medlens inspect`` says about an input, one describer per input kind (a registry).

Each describer reads enough of the input to tell the truth about it and raises a typed
:class:`~medlens.errors.InputError` naming the file when it cannot be read; the CLI only prints.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medlens.errors import CorruptFileError, NoImagesFoundError, NotFoundError
from medlens.io.discover import Found, FoundFile, discover, document_kind, kind_of
from medlens.registry import Registry

#: PIL mode -> bits per sample
_MODE_BITS = {"1": 1, "L": 8, "P": 8, "LA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "YCbCr": 8, "I;16": 16, "I": 32, "F": 32}


@dataclass
class Description:
    """Lines for stdout (what the input holds) and warnings for stderr (what was skipped and why)."""

    kind: str
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


Describer = Callable[[Path, Found | None], Description]
DESCRIBERS: Registry[Describer] = Registry("input kind")


def input_kind(path: Path, found: Found | None) -> str:
    """The describer for ``path``: slide, pdf, fhir, notes, nifti, raster or dicom."""
    from medlens.io.pdf import is_pdf
    from medlens.io.slide import find_slide

    if find_slide(path, found) is not None:
        return "slide"
    if path.is_file():
        if document := document_kind(path):
            return document
        if kind_of(path.name) == "dicom" and path.stat().st_size and is_pdf(path):
            return "pdf"
        kind = kind_of(path.name)
        if kind in ("nifti", "raster"):
            return kind
    return "dicom"


def describe(path: str | Path) -> Description:
    """Describe ``path`` (file, folder or zip); raises a typed InputError when it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError("no such file or folder", str(path))
    found = None if path.is_file() and kind_of(path.name) != "zip" else discover(path)
    try:
        kind = input_kind(path, found)
        result = DESCRIBERS.get(kind)(path, found)
    finally:
        if found is not None and found.tempdir is not None:
            found.tempdir.cleanup()
    if found is not None:
        result.warnings[:0] = found.warnings
    return result


@DESCRIBERS.register("slide")
def _slide(path: Path, found: Found | None) -> Description:
    from medlens.io.slide import find_slide

    spec = find_slide(path, found)
    assert spec is not None
    with spec.open() as slide:
        info = slide.summary()
    out = Description("slide")
    out.lines.append(
        f"slide ({info['backend']}): {info['width']}x{info['height']} px, mpp {info['mpp']}, "
        f"objective {info['objective_power']}"
    )
    for i, level in enumerate(info["levels"]):
        mag = f"{level['magnification']:.3g}x" if level["magnification"] else "magnification unknown"
        out.lines.append(f"  level {i}: {level['width']}x{level['height']}, downsample {level['downsample']:g}, {mag}")
    return out


@DESCRIBERS.register("dicom")
def _dicom(path: Path, found: Found | None) -> Description:
    from medlens.io.dicom import list_series, skipped_summary

    found = found if found is not None else Found(dicom=[FoundFile(path, str(path))])
    out = Description("dicom")
    skipped = list(found.skipped)
    series = list_series(found.dicom, skipped) if found.dicom else []
    for cand in series:
        status = "ok" if not cand.problems else f"not usable: {cand.problems[0]}"
        out.lines.append(f"{cand.summary()}  [{status}]")
    for f in [*found.nifti, *found.raster]:
        described = DESCRIBERS.get(kind_of(f.display))(f.path, None)
        out.lines += [f"{f.display}: {line}" for line in described.lines]
    if not out.lines:
        if path.is_file() and len(skipped) == 1:
            raise skipped[0]  # the input is this one file: its own reason
        if skipped:
            examples = "; ".join(str(e) for e in skipped[:3])
            raise NoImagesFoundError(f"no readable images ({skipped_summary(skipped)}; e.g. {examples})", str(path))
        raise NoImagesFoundError("no files found", str(path))
    if skipped:
        out.warnings.append(skipped_summary(skipped))
    return out


@DESCRIBERS.register("nifti")
def _nifti(path: Path, found: Found | None) -> Description:
    import nibabel as nib

    from medlens.io.nifti import read_nifti

    name = str(path)
    try:
        img = nib.load(name)
        header = img.header
        shape = tuple(int(n) for n in img.shape)
        zooms = tuple(float(z) for z in header.get_zooms())
        codes = "".join(nib.aff2axcodes(img.affine))
        dtype = str(header.get_data_dtype())
    except Exception as exc:  # nibabel raises many kinds for a bad header
        raise CorruptFileError(f"cannot read NIfTI header ({exc})", name) from None
    read_nifti(FoundFile(path, name)).load([0])  # the data must be readable too (truncation, compression)
    sizes = " x ".join(f"{z:g}" for z in zooms)
    return Description(
        "nifti",
        [f"NIfTI: shape {'x'.join(map(str, shape))}, voxel size {sizes} mm, orientation {codes}, dtype {dtype}"],
    )


@DESCRIBERS.register("raster")
def _raster(path: Path, found: Found | None) -> Description:
    from PIL import Image

    name = str(path)
    try:
        with Image.open(path) as img:
            img.load()
            width, height, mode, fmt = img.width, img.height, img.mode, img.format
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError ... for a bad file
        raise CorruptFileError(f"cannot read image ({exc})", name) from None
    bits = _MODE_BITS.get(mode, _MODE_BITS.get(mode.split(";")[0], 8))
    if mode.startswith("I;16"):
        bits = 16
    return Description("raster", [f"image ({fmt}): {width}x{height} px, mode {mode}, {bits} bits per sample"])


@DESCRIBERS.register("pdf")
def _pdf(path: Path, found: Found | None) -> Description:
    from medlens.io import pdf

    name = str(path)
    pdf._check_envelope(path)
    pdfium = pdf._pdfium()
    try:
        document = pdfium.PdfDocument(name)
    except pdfium.PdfiumError:
        if pdf._has_encrypt_entry(path):
            from medlens.errors import UnsupportedInputError

            raise UnsupportedInputError("the PDF is encrypted (password protected); decrypt it first", name) from None
        raise CorruptFileError("PDFium cannot open the PDF (damaged, or it has no pages)", name) from None
    out = Description("pdf")
    try:
        n_pages = len(document)
        if n_pages == 0:
            raise CorruptFileError("the PDF has no pages", name)
        with_text = 0
        for index in range(n_pages):
            width_pt, height_pt = document.get_page_size(index)
            page = document[index]
            try:
                textpage = page.get_textpage()
                text = textpage.get_text_range().strip()
                textpage.close()
            finally:
                page.close()
            with_text += bool(text)
            mm = f"{width_pt * 25.4 / 72:.0f}x{height_pt * 25.4 / 72:.0f} mm"
            out.lines.append(
                f"  page {index + 1}: {width_pt:.0f}x{height_pt:.0f} pt ({mm}), "
                f"{'text extractable' if text else 'no extractable text (scanned?)'}"
            )
    except pdfium.PdfiumError as exc:
        raise CorruptFileError(f"cannot read the PDF's pages ({exc})", name) from None
    finally:
        document.close()
    out.lines.insert(0, f"PDF: {n_pages} page(s), {with_text} with extractable text")
    if n_pages > pdf.DEFAULT_MAX_PAGES:
        out.warnings.append(f"lab-extract reads at most {pdf.DEFAULT_MAX_PAGES} pages; this PDF has {n_pages}")
    return out


@DESCRIBERS.register("fhir")
def _fhir(path: Path, found: Found | None) -> Description:
    from medlens.io.fhir import read_clinical

    record = read_clinical(path)  # validates the bundle and every resource medlens reads
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as exc:  # read_clinical already checked this
        raise CorruptFileError(f"cannot read the bundle ({exc})", str(path)) from None
    counts = Counter(
        e["resource"].get("resourceType", "?")
        for e in data.get("entry") or []
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    )
    out = Description("fhir", [f"FHIR Bundle: {sum(counts.values())} resource(s), {len(record.entries)} entries read"])
    out.lines += [f"  {rtype}: {n}" for rtype, n in sorted(counts.items())]
    if record.ignored:
        ignored = ", ".join(f"{kind} {n}" for kind, n in sorted(record.ignored.items()))
        out.warnings.append(f"not summarised by ehr-qa (resource types medlens does not read): {ignored}")
    out.warnings += record.notes
    return out


@DESCRIBERS.register("notes")
def _notes(path: Path, found: Found | None) -> Description:
    from medlens.io.fhir import read_clinical

    record = read_clinical(path)
    dated = sum(e.date is not None for e in record.entries)
    return Description(
        "notes",
        [f"clinical notes: {len(record.entries)} entries ({dated} dated, {len(record.entries) - dated} undated)"],
        list(record.notes),
    )
