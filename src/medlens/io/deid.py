"""De-identify DICOM files: PS3.15 Annex E Basic Application Level Confidentiality Profile.

The action of each attribute comes from the profile table (:mod:`medlens.io.deid_profile`); attributes the
table does not list are kept, except that every person name is emptied, every UID that is not a DICOM
well-known UID (``1.2.840.10008.*``) is replaced, and dates follow the date option. Private tags, overlay
data and curves are removed. Sequences are processed item by item.

- UIDs: ``2.25.<int>`` from a keyed SHA-256 of the original UID, so that one input UID always gives the same
  output UID within one run (a random key) or across runs (``salt``): references between files (series,
  frame of reference, referenced instances) stay valid.
- Dates: removed (the table's action), kept (``K``, Retain Longitudinal Temporal Information with Full Dates
  Option) or shifted (``C``, Modified Dates Option) back by a per-patient offset of 1..N days derived from the
  key and the original Patient ID; times are kept when dates are shifted.
- Burned-in text: files with BurnedInAnnotation YES, or without it for modalities that often carry text
  (US, SC, XA, ES) or secondary captures, are refused unless allowed (they are then marked Patient Identity
  Removed NO, since the pixels may still name the patient). Pixel data is never changed.
- Output: the input's folder structure with every folder and file renamed (no PHI in names); written to a
  temporary folder that becomes the output only when every file is done.

pydicom is imported inside functions.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlens.errors import (
    CorruptFileError,
    InputError,
    MedlensError,
    NoImagesFoundError,
    NotFoundError,
    OutputFolderError,
    UnsupportedInputError,
)
from medlens.io.deid_profile import DATE_VRS, profile_tags

#: UIDs under this root are defined by the standard (SOP classes, transfer syntaxes ...) and never replaced
WELL_KNOWN_ROOT = "1.2.840.10008."
#: modalities whose images often carry burned-in text when BurnedInAnnotation is absent
BURNED_IN_MODALITIES = ("US", "SC", "XA", "ES")
#: secondary capture SOP classes (screen captures, scanned documents ...)
SECONDARY_CAPTURE_ROOT = "1.2.840.10008.5.1.4.1.1.7"
#: the bytes a salt file holds when medlens creates it
SALT_BYTES = 32
#: DICOM code 113100 and the date options' codes (CID 7050)
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
DATE_OPTION_CODES = {
    "keep": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "shift": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
}
#: dummy values of action D, by value representation
DUMMIES: dict[str, Any] = {
    "PN": "ANONYMOUS",
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
}
DATE_MODES = ("remove", "keep", "shift")


@dataclass(frozen=True)
class DeidOptions:
    """``dates``: remove, keep or shift (back by 1..``shift_days`` days per patient); ``salt``: the key of
    UIDs, pseudonyms and date offsets (random per run when None)."""

    dates: str = "remove"
    shift_days: int = 0
    allow_burned_in: bool = False
    salt: bytes | None = None


@dataclass
class DeidReport:
    """What one run did."""

    output: Path
    files: int = 0
    skipped: list[str] = field(default_factory=list)
    patients: int = 0
    uids_replaced: int = 0
    burned_in_allowed: int = 0
    dates: str = "remove"

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "files": self.files,
            "skipped": len(self.skipped),
            "patients": self.patients,
            "uids_replaced": self.uids_replaced,
            "burned_in_allowed": self.burned_in_allowed,
            "dates": self.dates,
        }


Handler = Callable[["Deidentifier", Any, Any], None]
#: action code -> what it does to one element of a dataset
ACTION_HANDLERS: dict[str, Handler] = {}


def _action(code: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        ACTION_HANDLERS[code] = handler
        return handler

    return register


class Deidentifier:
    """Applies the profile to datasets, keeping its UID map and per-patient date offsets across files."""

    def __init__(self, options: DeidOptions | None = None) -> None:
        self.options = options or DeidOptions()
        if self.options.dates not in DATE_MODES:
            raise MedlensError(f"dates must be one of {', '.join(DATE_MODES)}, not {self.options.dates!r}")
        if self.options.dates == "shift" and self.options.shift_days < 1:
            raise MedlensError(f"--shift-dates needs a number of days >= 1, not {self.options.shift_days}")
        self.salt = self.options.salt or secrets.token_bytes(SALT_BYTES)
        self.uids: dict[str, str] = {}
        self.patients: set[str] = set()
        self._offset = 0

    def keyed(self, kind: str, value: str) -> bytes:
        """The keyed SHA-256 of ``value`` (``kind`` separates uses of the key)."""
        return hmac.new(self.salt, f"{kind}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        """The replacement of one UID (the same for the same input, well-known UIDs unchanged)."""
        value = str(value).strip().rstrip("\0")
        if not value or value.startswith(WELL_KNOWN_ROOT):
            return value
        if value not in self.uids:
            self.uids[value] = "2.25." + str(int.from_bytes(self.keyed("uid", value)[:16], "big"))
        return self.uids[value]

    def name(self, kind: str, value: str, chars: int = 12) -> str:
        """A short keyed hex name (file and folder names, pseudonyms)."""
        return self.keyed(kind, value).hex()[:chars]

    def date_offset(self, patient: str) -> int:
        """Days to move this patient's dates back (1..shift_days)."""
        days = max(self.options.shift_days, 1)
        return 1 + int.from_bytes(self.keyed("date", patient)[:8], "big") % days

    def dataset(self, ds: Any, burned_in_allowed: bool = False) -> None:
        """De-identify ``ds`` in place (file meta included) and mark it as de-identified."""
        patient = f"{ds.get('PatientID', '')}\0{ds.get('PatientName', '')}"
        self.patients.add(patient)
        self._offset = self.date_offset(patient) if self.options.dates == "shift" else 0
        self._items(ds)
        self._mark(ds, burned_in_allowed)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                            "ReceivingApplicationEntityTitle"):  # fmt: skip
                if keyword in meta:
                    del meta[keyword]
            if "SOPInstanceUID" in ds:
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

    def _items(self, ds: Any) -> None:
        table = profile_tags()
        for tag in list(ds.keys()):
            elem = ds[tag]
            group = tag >> 16
            if elem.tag.is_private or (0x6000 <= group <= 0x60FF and tag & 0xFFFF in (0x3000, 0x4000)):
                del ds[tag]
                continue
            if 0x5000 <= group <= 0x50FF:  # curves (retired): removed
                del ds[tag]
                continue
            action = self._action_for(int(tag), elem.VR, table)
            if action is None:
                if elem.VR == "SQ":
                    for item in elem.value or []:
                        self._items(item)
                continue
            ACTION_HANDLERS[action](self, ds, elem)

    def _action_for(self, tag: int, vr: str, table: dict[int, str]) -> str | None:
        action = table.get(tag)
        if action is None:
            action = {"PN": "Z", "UI": "U", "DA": "Z", "DT": "Z"}.get(vr)
        if action is not None and vr in DATE_VRS:
            action = {"remove": action, "keep": "K", "shift": "C"}[self.options.dates]
        return action

    def _mark(self, ds: Any, burned_in_allowed: bool) -> None:
        from pydicom.dataset import Dataset

        def code(value: str, meaning: str) -> Dataset:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            return item

        codes = [BASIC_PROFILE_CODE]
        if self.options.dates in DATE_OPTION_CODES:
            codes.append(DATE_OPTION_CODES[self.options.dates])
        ds.PatientIdentityRemoved = "NO" if burned_in_allowed else "YES"
        method = "medlens: PS3.15 Basic Application Level Confidentiality Profile"
        if self.options.dates == "shift":
            method += "; dates shifted"
        if burned_in_allowed:
            method += "; burned-in annotation not removed"
        ds.DeidentificationMethod = method[:64]
        ds.DeidentificationMethodCodeSequence = [code(*c) for c in codes]
        ds.LongitudinalTemporalInformationModified = {"remove": "REMOVED", "keep": "UNMODIFIED", "shift": "MODIFIED"}[
            self.options.dates
        ]


@_action("X")
def _remove(deid: Deidentifier, ds: Any, elem: Any) -> None:
    del ds[elem.tag]


@_action("Z")
def _empty(deid: Deidentifier, ds: Any, elem: Any) -> None:
    elem.value = [] if elem.VR == "SQ" else None


@_action("D")
def _dummy(deid: Deidentifier, ds: Any, elem: Any) -> None:
    if elem.VR == "UI":
        _replace_uid(deid, ds, elem)
    elif elem.VR == "SQ":
        elem.value = []
    elif elem.VR in DUMMIES:
        elem.value = DUMMIES[elem.VR]
    elif elem.VR in ("LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE"):  # a keyed pseudonym keeps links
        elem.value = "ANON" + deid.name("dummy", str(elem.value), 10).upper() if elem.value else elem.value
    else:
        elem.value = None


@_action("K")
def _keep(deid: Deidentifier, ds: Any, elem: Any) -> None:
    if elem.VR == "SQ":
        for item in elem.value or []:
            deid._items(item)


@_action("C")
def _clean(deid: Deidentifier, ds: Any, elem: Any) -> None:
    if elem.VR == "TM":  # dates move by whole days; times stay
        return
    if elem.VR not in ("DA", "DT"):
        _empty(deid, ds, elem)
        return
    values = elem.value if elem.VM > 1 else [elem.value]
    shifted = [_shift(str(v), elem.VR, deid._offset) for v in values if v not in (None, "")]
    elem.value = shifted if len(shifted) > 1 else (shifted[0] if shifted else None)


@_action("U")
def _replace_uid(deid: Deidentifier, ds: Any, elem: Any) -> None:
    if elem.VR == "SQ":
        for item in elem.value or []:
            deid._items(item)
        return
    if elem.VR != "UI":
        _empty(deid, ds, elem)
        return
    if elem.VM > 1:
        elem.value = [deid.uid(v) for v in elem.value]
    elif elem.value:
        elem.value = deid.uid(elem.value)


def _shift(value: str, vr: str, days: int) -> str:
    """A DA or DT value moved back ``days`` days (a value that is not a date becomes empty)."""
    value = value.strip()
    try:
        day = dt.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    moved = (day - dt.timedelta(days=days)).strftime("%Y%m%d")
    return moved + value[8:] if vr == "DT" else moved


def burned_in_reason(ds: Any) -> str | None:
    """Why the pixels may carry burned-in text, or None."""
    flag = str(ds.get("BurnedInAnnotation", "")).strip().upper()
    if flag == "YES":
        return "BurnedInAnnotation is YES"
    if flag == "NO":
        return None
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality in BURNED_IN_MODALITIES:
        return f"modality {modality} without BurnedInAnnotation"
    if str(ds.get("SOPClassUID", "")).startswith(SECONDARY_CAPTURE_ROOT):
        return "a secondary capture without BurnedInAnnotation"
    return None


def read_salt(path: str | Path) -> bytes:
    """The key in a salt file; a file that does not exist is created (private) with a random key."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_hex(SALT_BYTES).encode() + b"\n")
    salt = path.read_bytes().strip()
    if len(salt) < 16:
        raise InputError("a salt file must hold at least 16 bytes", str(path))
    return salt


def _sources(source: Path, out: Path) -> list[Path]:
    if not source.exists():
        raise NotFoundError("no such file or folder", str(source))
    if source.is_file():
        return [source]
    if out.resolve().is_relative_to(source.resolve()):
        raise OutputFolderError("the output folder must not be inside the input folder", str(out))
    return sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
    )


def _read(path: Path, single: bool, headers_only: bool) -> Any | None:
    """The dataset of ``path``, or None for a file that is not DICOM inside a folder."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=headers_only)
    except InvalidDicomError as exc:
        if single:
            raise UnsupportedInputError(f"not a DICOM file ({exc})", str(path)) from None
        return None
    except (OSError, ValueError, EOFError, AttributeError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"cannot read the DICOM header ({type(exc).__name__}: {exc})", str(path)) from None


def deidentify(source: str | Path, out: str | Path, options: DeidOptions | None = None) -> DeidReport:
    """De-identify the DICOM file or folder ``source`` into the folder ``out`` (new, or empty)."""
    options = options or DeidOptions()
    source, out = Path(source), Path(out)
    deid = Deidentifier(options)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputFolderError("the output must be a new or empty folder", str(out))
    files = _sources(source, out)
    single = source.is_file()
    report = DeidReport(output=out, dates=options.dates)
    todo: list[tuple[Path, bool]] = []
    for path in files:  # headers first: nothing is written when a file is refused
        ds = _read(path, single, headers_only=True)
        if ds is None or "DirectoryRecordSequence" in ds:  # not DICOM, or a DICOMDIR (stale once renamed)
            report.skipped.append(str(path))
            continue
        reason = burned_in_reason(ds)
        if reason and not options.allow_burned_in:
            raise InputError(f"may carry burned-in text ({reason}); refused unless --allow-burned-in", str(path))
        todo.append((path, reason is not None))
    if not todo:
        raise NoImagesFoundError("no DICOM files to de-identify", str(source))
    partial = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    partial.mkdir(parents=True)
    try:
        for path, burned in todo:
            ds = _read(path, single, headers_only=False)
            deid.dataset(ds, burned_in_allowed=burned)
            report.burned_in_allowed += burned
            rel = path.relative_to(source).parent if not single else Path()
            folder = partial.joinpath(
                *(deid.name("dir", "/".join(rel.parts[: i + 1]), 10) for i in range(len(rel.parts)))
            )
            folder.mkdir(parents=True, exist_ok=True)
            _write(ds, folder / f"{deid.name('file', str(ds.get('SOPInstanceUID', path)))}.dcm")
            report.files += 1
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    report.patients = len(deid.patients)
    report.uids_replaced = len(deid.uids)
    return report


def _write(ds: Any, path: Path) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.setdefault("TransferSyntaxUID", ExplicitVRLittleEndian)
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.setdefault("ImplementationClassUID", PYDICOM_IMPLEMENTATION_UID)
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
