"""Find the files inside an input path (a file, a folder searched recursively, or a zip archive)."""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from medlens.errors import CorruptFileError, InputError, NotFoundError, TooLargeError, UnsupportedInputError
from medlens.io.limits import max_archive_bytes

NIFTI_SUFFIXES = (".nii", ".nii.gz")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: names that are never images, skipped with a reason instead of being tried as DICOM
NOT_IMAGE_SUFFIXES = (
    ".txt", ".json", ".xml", ".csv", ".md", ".html", ".htm", ".pdf", ".py", ".log", ".ini", ".yaml", ".yml",
    ".dump", ".icc", ".gz", ".tar", ".tgz", ".7z",
)  # fmt: skip


@dataclass(frozen=True)
class FoundFile:
    """A file to read and the name to show for it (``archive.zip!inner/path`` for zip members)."""

    path: Path
    display: str


@dataclass
class Found:
    """The files of an input, sorted by kind, and those skipped with the reason why."""

    dicom: list[FoundFile] = field(default_factory=list)
    nifti: list[FoundFile] = field(default_factory=list)
    raster: list[FoundFile] = field(default_factory=list)
    skipped: list[InputError] = field(default_factory=list)
    tempdir: tempfile.TemporaryDirectory | None = None


def kind_of(name: str) -> str:
    """``nifti``, ``raster``, ``zip``, ``other`` or ``dicom`` (anything else is tried as DICOM)."""
    lower = name.lower()
    if lower.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if lower.endswith(RASTER_SUFFIXES):
        return "raster"
    if lower.endswith(".zip"):
        return "zip"
    base = lower.rsplit("/", 1)[-1]
    if base == "dicomdir" or lower.endswith(NOT_IMAGE_SUFFIXES):
        return "other"
    return "dicom"


def discover(path: Path) -> Found:
    """The input's files. A zip archive is unpacked to a temporary folder that lives as long as
    ``Found.tempdir`` (hand it on to whatever keeps reading the files)."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError("no such file or folder", str(path))
    if path.is_file() and kind_of(path.name) == "zip":
        tmp = tempfile.TemporaryDirectory(prefix="medlens-zip-")
        try:
            found = _found(_unzip(path, Path(tmp.name)), top_level=False)
        except BaseException:
            tmp.cleanup()
            raise
        found.tempdir = tmp
        return found
    if path.is_file():
        return _found([FoundFile(path, str(path))], top_level=True)
    files = [
        FoundFile(p, str(p))
        for p in sorted(path.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    return _found(files, top_level=False)


def _found(files: list[FoundFile], top_level: bool) -> Found:
    found = Found()
    for f in files:
        kind = kind_of(f.display)
        if kind == "zip":
            found.skipped.append(UnsupportedInputError("archive inside the input (unpack it first)", f.display))
        elif kind == "other" and not top_level:
            found.skipped.append(UnsupportedInputError("not an image file", f.display))
        else:
            getattr(found, kind if kind != "other" else "dicom").append(f)
    return found


def _unzip(archive: Path, dest: Path) -> list[FoundFile]:
    """Extract members under generated names (no path traversal), within the archive budget."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            total = sum(m.file_size for m in members)
            if total > max_archive_bytes():
                raise TooLargeError(
                    f"archive unpacks to {total / 2**20:,.0f} MB, over the budget (MEDLENS_MAX_ARCHIVE_MB)",
                    str(archive),
                )
            out: list[FoundFile] = []
            for i, member in enumerate(members):
                name = member.filename
                if any(part.startswith(".") or part == "__MACOSX" for part in name.split("/")):
                    continue
                suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else Path(name).suffix[:10]
                target = dest / f"{i:06d}{suffix}"
                with zf.open(member) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                out.append(FoundFile(target, f"{archive}!{name}"))
            return out
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise CorruptFileError(f"cannot read zip archive ({exc})", str(archive)) from None
