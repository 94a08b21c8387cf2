"""Reading studies: DICOM files/folders/zips, NIfTI volumes and image files -> an ordered ImageStack.

``io`` knows files and DICOM, nothing about models.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medlens.errors import NoImagesFoundError, UnsupportedInputError
from medlens.io.discover import Found, discover, document_kind
from medlens.io.types import ImageStack, SliceRef, TableVOI, WindowVOI
from medlens.progress import Update as Progress
from medlens.registry import Registry

Reader = Callable[[Found, str, str | None, str | None, Progress | None], ImageStack]

READERS: Registry[Reader] = Registry("reader")
#: files that are inputs of a task, not image studies: what to run instead
TASK_HINTS = {
    "pdf": "for a lab report use `medlens ask FILE --task lab-extract`",
    "fhir": "for a FHIR bundle use `medlens ask FILE QUESTION --task ehr-qa`",
    "notes": "for clinical notes use `medlens ask FILE QUESTION --task ehr-qa`",
}


@READERS.register("dicom")
def _dicom(found: Found, source: str, series: str | None, modality: str | None, progress: Progress | None):
    from medlens.io.dicom import read_dicom

    return read_dicom(found.dicom, found.skipped, source, series=series, progress=progress)


@READERS.register("nifti")
def _nifti(found: Found, source: str, series: str | None, modality: str | None, progress: Progress | None):
    from medlens.io.nifti import read_nifti

    return read_nifti(_single(found.nifti, "NIfTI", source), modality)


@READERS.register("raster")
def _raster(found: Found, source: str, series: str | None, modality: str | None, progress: Progress | None):
    from medlens.io.raster import read_raster

    return read_raster(_single(found.raster, "image", source), modality)


def open_input(
    path: str | Path,
    series: str | None = None,
    modality: str | None = None,
    progress: Progress | None = None,
    found: Found | None = None,
) -> ImageStack:
    """Read ``path`` (file, folder or zip, or ``dicomweb://SERVER/STUDY[/SERIES]``) and return the stack the
    model should see.

    ``series`` (a SeriesInstanceUID or its short hash) picks a DICOM series; ``modality`` (CT, MR, CR ...)
    sets what files without metadata (NIfTI, PNG) are taken to be. Slices are decoded on ``stack.load``.
    ``found``: the input's files when already discovered (see :func:`discover_input`).
    """
    source = str(path)
    if _remote(source):  # dicomweb://SERVER/STUDY[/SERIES]: a study on a configured server
        from medlens.io.dicomweb import read_dicomweb

        return read_dicomweb(source, series=series, progress=progress)
    document = document_kind(Path(path))
    hint = TASK_HINTS[document] if document else None
    if hint:
        raise UnsupportedInputError(f"not an image study; {hint}", source)
    found = found if found is not None else discover(Path(path))
    kinds = [k for k in ("dicom", "nifti", "raster") if getattr(found, k)]
    if not kinds:
        if found.skipped:
            raise NoImagesFoundError(f"no readable images ({len(found.skipped)} file(s) skipped)", source)
        raise NoImagesFoundError("no files found", source)
    for i, kind in enumerate(kinds):
        try:
            stack = READERS.get(kind)(found, source, series, modality, progress)
            break
        except NoImagesFoundError:
            if i == len(kinds) - 1:
                raise
    stack.keepalive = found.tempdir
    others = [k for k in kinds if k != kind]
    if others:
        stack.notes.append(f"read the {kind} files; ignored the {' and '.join(others)} files")
    if modality and kind == "dicom" and modality.upper() != stack.modality:
        stack.notes.append(f"--modality {modality} ignored: the DICOM header says {stack.modality}")
    return stack


def discover_input(path: str | Path) -> Found | None:
    """The files of a folder or zip (unpacked once), ``None`` for a single file (read directly) or a
    ``dicomweb://`` study."""
    if _remote(str(path)):
        return None
    p = Path(path)
    if p.is_file() and not p.name.lower().endswith(".zip"):
        return None
    return discover(p)


def _remote(source: str) -> bool:
    """A ``dicomweb:`` reference (a local file of that name is still read as a file)."""
    return source.startswith("dicomweb:") and not Path(source).exists()


def _single(files: list, what: str, source: str):
    if len(files) > 1:
        raise UnsupportedInputError(f"{len(files)} {what} files found; give one file at a time", source)
    return files[0]


__all__ = ["READERS", "ImageStack", "SliceRef", "TableVOI", "WindowVOI", "discover_input", "open_input"]
