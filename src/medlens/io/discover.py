"""Find the files inside an input path (a file, a folder searched recursively, or a zip archive)."""

from __future__ import annotations

import tempfile
import zipfile
import zlib
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
#: inputs of a task that are documents, not image studies: suffix -> ``pdf`` (lab report), ``fhir`` (a FHIR
#: bundle) or ``notes`` (clinical notes)
DOCUMENT_SUFFIXES = {".pdf": "pdf", ".json": "fhir", ".txt": "notes", ".md": "notes"}


def document_kind(path: Path) -> str | None:
    """``pdf``, ``fhir`` or ``notes`` for a file that is a document input (by its suffix), else None."""
    return DOCUMENT_SUFFIXES.get(path.suffix.lower()) if path.is_file() else None


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
    #: zip members left unextracted for safety, one line each naming the member and the reason
    warnings: list[str] = field(default_factory=list)


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
            files, unsafe = _unzip(path, Path(tmp.name))
            found = _found(files, top_level=False)
            found.warnings = unsafe
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


def unsafe_reason(member: zipfile.ZipInfo) -> str | None:
    """Why a zip member is not extracted for safety (a path leaving the archive, an absolute path, a symlink),
    or None for an ordinary member."""
    name = member.filename.replace("\\", "/")
    if (member.external_attr >> 16) & 0o170000 == 0o120000:
        return "a symbolic link"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in name.split("/"):
        return "a path leaving the archive (..)"
    return None


#: what zipfile raises on a damaged archive (IndexError/ValueError on malformed headers: found by fuzzing)
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error, IndexError, ValueError)


def unsafe_members(archive: str | Path) -> list[str]:
    """The warnings :func:`discover` records for ``archive``'s unsafe members, read from its directory only
    (nothing is extracted); empty for a file that is not a readable zip."""
    try:
        with zipfile.ZipFile(archive) as zf:
            return [_unsafe_line(archive, m, why) for m in zf.infolist() if (why := unsafe_reason(m))]
    except ZIP_ERRORS:
        return []


def _unsafe_line(archive: str | Path, member: zipfile.ZipInfo, why: str) -> str:
    return f"skipped zip member {member.filename!r} of {archive} for safety: {why}"


def _unzip(archive: Path, dest: Path) -> tuple[list[FoundFile], list[str]]:
    """Extract members under generated names (no path traversal), within the archive budget; members that are
    symlinks or whose names are absolute or climb out with ``..`` are not extracted but named in a warning."""
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
            unsafe: list[str] = []
            for i, member in enumerate(members):
                name = member.filename
                if why := unsafe_reason(member):
                    unsafe.append(_unsafe_line(archive, member, why))
                    continue
                if any(part.startswith(".") or part == "__MACOSX" for part in name.split("/")):
                    continue
                suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else Path(name).suffix[:10]
                target = dest / f"{i:06d}{suffix}"
                with zf.open(member) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                out.append(FoundFile(target, f"{archive}!{name}"))
            return out, unsafe
    except ZIP_ERRORS as exc:
        raise CorruptFileError(f"cannot read zip archive ({exc})", str(archive)) from None
    except (NotImplementedError, RuntimeError) as exc:  # a compression method zipfile lacks; an encrypted member
        raise UnsupportedInputError(f"cannot unpack zip archive ({exc})", str(archive)) from None
