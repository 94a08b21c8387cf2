"""Uploads: multipart parts streamed into a private folder (mode 0700), names checked, zips checked before
anything is extracted, and the task inputs made from what was uploaded.

Layout of one request's folder: ``files/<upload name>`` (the parts as sent), ``zips/<n>/`` (a checked zip
extracted under its own member names), ``inputs/<n>/`` (links to the files of an input that names several).
"""

from __future__ import annotations

import email.message
import email.utils
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from medlens.files import sha256_of
from medlens.io.discover import ZIP_ERRORS, unsafe_reason
from medlens.serve.problems import ApiError, BadField
from medlens.serve.settings import ServeSettings

#: form fields besides the file parts
FORM_FIELDS = ("inputs", "task", "question", "options", "return_images")
#: zip members smaller than this are never a bomb, whatever their ratio
RATIO_FLOOR = 1 << 20
MAX_NAME = 1024
MAX_HEADER = 16384


class UploadError(ApiError):
    """A bad upload: a file name, the file count, a zip member (400, naming it and the reason)."""

    status, kind = 400, "UploadError"


def new_request_dir(settings: ServeSettings) -> Path:
    """A fresh private folder (0700) under the data dir's ``tmp``."""
    settings.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(settings.tmp_dir, 0o700)
    return Path(tempfile.mkdtemp(prefix="req-", dir=settings.tmp_dir))


def safe_name(name: str) -> str:
    """The relative path a part's file name stands for; 400 for ``..``, absolute paths, backslashes, NUL."""
    if not name or len(name) > MAX_NAME:
        raise UploadError(f"file name {name[:80]!r}: empty or longer than {MAX_NAME} characters")
    if "\0" in name or "\\" in name:
        raise UploadError(f"file name {name!r}: backslashes and NUL characters are not allowed")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UploadError(f"file name {name!r}: an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UploadError(f"file name {name!r}: a path leaving the upload (..)")
    if not parts:
        raise UploadError(f"file name {name!r}: no file name")
    return "/".join(parts)


@dataclass
class Upload:
    """One request's uploaded files (upload name -> path) and its text fields."""

    root: Path
    files: dict[str, Path] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    #: server path prefix -> the name the client knows (for error messages and the envelope)
    names: dict[str, str] = field(default_factory=dict)

    @property
    def files_dir(self) -> Path:
        return self.root / "files"

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files.values() if p.exists())


class MultipartReceiver:
    """Feeds a multipart body, chunk by chunk, into :class:`Upload` (python-multipart's streaming parser)."""

    def __init__(self, content_type: str, upload: Upload, settings: ServeSettings) -> None:
        from python_multipart.multipart import MultipartParser, parse_options_header

        kind, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise BadField("the body must be multipart/form-data with a boundary", 400)
        self.upload, self.settings = upload, settings
        self.headers: dict[str, str] = {}
        self._field, self._value = b"", b""
        self._name: str | None = None
        self._target: str | None = None
        self._handle: IO[bytes] | None = None
        self._text = bytearray()
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": lambda d, s, e: self._add("_field", d[s:e]),
                "on_header_value": lambda d, s, e: self._add("_value", d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done,
                "on_part_data": self._data,
                "on_part_end": self._end,
            },
        )

    def _add(self, attr: str, data: bytes) -> None:
        value = getattr(self, attr) + data
        if len(value) > MAX_HEADER:
            raise BadField(f"a part header is longer than {MAX_HEADER} bytes", 400)
        setattr(self, attr, value)

    def _begin(self) -> None:
        self.headers, self._name, self._target, self._handle = {}, None, None, None
        self._text = bytearray()

    def _header_end(self) -> None:
        if len(self.headers) >= 32:
            raise BadField("a part has more than 32 headers", 400)
        self.headers[self._field.decode("latin-1").lower()] = self._value.decode("utf-8", "replace")
        self._field, self._value = b"", b""

    def _headers_done(self) -> None:
        message = email.message.Message()
        message["content-disposition"] = self.headers.get("content-disposition", "")
        name = message.get_param("name", header="content-disposition")
        filename = message.get_param("filename", header="content-disposition")
        name = email.utils.collapse_rfc2231_value(name) if name else None
        if filename is not None:
            if name != "files":
                raise BadField(f"form field {name!r} cannot hold a file (upload files as 'files')")
            self._start_file(email.utils.collapse_rfc2231_value(filename))
            return
        if name not in FORM_FIELDS:
            import difflib

            close = difflib.get_close_matches(str(name), [*FORM_FIELDS, "files"], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BadField(f"unknown form field {name!r}{hint}")
        self._name = name

    def _start_file(self, filename: str) -> None:
        upload = self.upload
        relative = safe_name(filename)
        if relative in upload.files:
            raise UploadError(f"file name {relative!r}: uploaded twice")
        if len(upload.files) >= self.settings.max_files:
            raise UploadError(f"more than {self.settings.max_files} files in one request (max_files)")
        target = upload.files_dir / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._handle = open(target, "xb")  # noqa: SIM115 - closed in _end / close
        except OSError:  # a file where a folder is needed, or the reverse
            raise UploadError(f"file name {relative!r}: clashes with another uploaded file or folder") from None
        upload.files[relative] = target
        self._target = relative

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._handle is not None:
            self._handle.write(data[start:end])
        elif self._name is not None:
            self._text += data[start:end]
            if len(self._text) > self.settings.max_field_kb * 1024:
                raise BadField(f"form field {self._name!r} is over {self.settings.max_field_kb} KB", 413)

    def _end(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        elif self._name is not None:
            if self._name in self.upload.fields:
                raise BadField(f"form field {self._name!r} given twice")
            self.upload.fields[self._name] = self._text.decode("utf-8", "replace")
        self._name = self._target = None

    def feed(self, chunk: bytes) -> None:
        self.parser.write(chunk)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self.parser.finalize()


async def receive_upload(request: Any, settings: ServeSettings) -> Upload:
    """Stream the request's multipart body into a new private folder; the caller removes it (``cleanup``)."""
    from python_multipart.exceptions import MultipartParseError

    upload = Upload(new_request_dir(settings))
    upload.files_dir.mkdir(mode=0o700)
    upload.names = {f"{upload.files_dir}/": "", str(upload.files_dir): "upload", str(upload.root): "upload"}
    try:
        receiver = MultipartReceiver(request.headers.get("content-type", ""), upload, settings)
        try:
            async for chunk in request.stream():
                receiver.feed(chunk)
        finally:
            receiver.close()
    except MultipartParseError as exc:
        upload.cleanup()
        raise BadField(f"the multipart body cannot be read ({exc})", 400) from None
    except BaseException:
        upload.cleanup()
        raise
    return upload


# ---------------------------------------------------------------- zips


def check_zip(path: Path, name: str, settings: ServeSettings) -> list[zipfile.ZipInfo]:
    """The members of the uploaded zip ``name`` to extract; 400 naming the member and the reason for a member
    that leaves the archive, is absolute, a symlink, encrypted, or expands past the ratio or size limits."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except ZIP_ERRORS as exc:
        raise UploadError(f"{name}: cannot read zip archive ({exc})") from None
    total = 0
    packed = 0
    limit = settings.max_unzipped_bytes
    for member in members:
        if why := unsafe_reason(member):
            raise UploadError(f"{name}: zip member {member.filename!r} is {why}")
        if member.flag_bits & 0x1:
            raise UploadError(f"{name}: zip member {member.filename!r} is encrypted")
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size >= RATIO_FLOOR and ratio > settings.max_zip_ratio:
            raise UploadError(
                f"{name}: zip member {member.filename!r} expands {ratio:,.0f}:1, over the "
                f"{settings.max_zip_ratio:g}:1 limit (a decompression bomb?)"
            )
        total += member.file_size
        packed += member.compress_size
        if total > limit:
            raise UploadError(
                f"{name}: zip member {member.filename!r} takes the archive past {limit / 2**20:g} MB unpacked "
                "(max_unzipped_mb)"
            )
    if total >= RATIO_FLOOR and total / max(packed, 1) > settings.max_zip_ratio:
        raise UploadError(f"{name}: the archive expands {total / max(packed, 1):,.0f}:1, over the limit")
    return [m for m in members if not m.is_dir()]


def extract_zip(path: Path, name: str, dest: Path, settings: ServeSettings) -> None:
    """Extract the checked members of ``path`` under ``dest`` by their own (checked) names, never writing
    more bytes than each member's header declares."""
    members = check_zip(path, name, settings)
    dest.mkdir(parents=True, mode=0o700)
    try:
        with zipfile.ZipFile(path) as zf:
            for member in members:
                relative = safe_name(member.filename)
                target = dest / relative
                if not target.resolve().is_relative_to(dest.resolve()):
                    raise UploadError(f"{name}: zip member {member.filename!r} leaves the archive")
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                budget = member.file_size
                with zf.open(member) as src, open(target, "xb") as out:
                    while chunk := src.read(1 << 20):
                        budget -= len(chunk)
                        if budget < 0:
                            raise UploadError(f"{name}: zip member {member.filename!r} is larger than it declares")
                        out.write(chunk)
    except FileExistsError:
        raise UploadError(f"{name}: zip member names repeat") from None
    except ZIP_ERRORS as exc:
        raise UploadError(f"{name}: cannot read zip archive ({exc})") from None
    except (NotImplementedError, RuntimeError) as exc:
        raise UploadError(f"{name}: cannot unpack zip archive ({exc})") from None


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class StudyInput:
    """One task input: the path handed to the task, the name the client knows it by, and its hash."""

    path: Path
    name: str
    sha256: str


def parse_inputs(text: str | None) -> list[dict[str, Any]] | None:
    """The ``inputs`` field: a JSON list of ``{"files": [...]}`` or ``{"dicomweb": {...}}`` items."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BadField(f"form field 'inputs' is not JSON ({exc})") from None
    if not isinstance(value, list) or not value:
        raise BadField("form field 'inputs' must be a non-empty JSON list")
    for n, item in enumerate(value, 1):
        sources = [k for k in ("files", "dicomweb") if isinstance(item, dict) and k in item]
        if not isinstance(item, dict) or len(sources) != 1 or len(item) != 1:
            raise BadField(f"input {n} must have exactly one source: 'files' or 'dicomweb'")
        if sources == ["files"] and (
            not isinstance(item["files"], list)
            or not item["files"]
            or not all(isinstance(f, str) for f in item["files"])
        ):
            raise BadField(f"input {n}: 'files' must be a non-empty list of uploaded file names")
    return value


def study_inputs(upload: Upload, spec: list[dict[str, Any]] | None, settings: ServeSettings) -> list[StudyInput]:
    """The task inputs: each ``files`` item (one name: that file; several: a folder of them; a zip: its
    checked, extracted contents); no ``inputs``: every uploaded file as one input."""
    if spec is None:
        if not upload.files:
            raise BadField("no files uploaded (form field 'files')")
        spec = [{"files": list(upload.files)}]
    made: list[StudyInput] = []
    for n, item in enumerate(spec):
        if "dicomweb" in item:
            made.append(dicomweb_input(item["dicomweb"], n))
            continue
        names = [safe_name(f) for f in item["files"]]
        for f in names:
            if f not in upload.files:
                raise UploadError(f"input {n + 1} names {f!r}, which was not uploaded")
        made.append(_one_input(upload, names, n, settings))
    return made


def dicomweb_input(ref: Any, n: int) -> StudyInput:
    """``{"server": NAME, "study": UID, "series": UID?}``: a study on a DICOMweb server this machine's
    configuration names (never a URL from the request); an unknown name is refused before any connection."""
    from medlens.errors import InputError
    from medlens.io.dicomweb import parse_ref
    from medlens.io.dicomweb_config import get_server

    wanted = {"server", "study", "series"}
    if not isinstance(ref, dict) or not {"server", "study"} <= set(ref) or not set(ref) <= wanted:
        raise BadField(f'input {n + 1}: \'dicomweb\' must be {{"server": NAME, "study": UID, "series": UID}}')
    if not all(isinstance(v, str) for v in ref.values()):
        raise BadField(f"input {n + 1}: the 'dicomweb' server, study and series must be strings")
    text = f"dicomweb://{ref['server']}/{ref['study']}" + (f"/{ref['series']}" if ref.get("series") else "")
    try:
        get_server(ref["server"])
        parse_ref(text)
    except InputError as exc:
        raise UploadError(f"input {n + 1}: {exc}") from None
    return StudyInput(Path(text), text, hashlib.sha256(text.encode()).hexdigest())


def _one_input(upload: Upload, names: list[str], n: int, settings: ServeSettings) -> StudyInput:
    if len(names) == 1:
        name = names[0]
        path = upload.files[name]
        digest = sha256_of(path)
        if name.lower().endswith(".zip"):
            dest = upload.root / "zips" / str(n)
            extract_zip(path, name, dest, settings)
            upload.names |= {f"{dest}/": f"{name}!", str(dest): name}
            return StudyInput(dest, name, digest)
        return StudyInput(path, name, digest)
    if sorted(names) == sorted(upload.files):
        folder = upload.files_dir
    else:
        folder = upload.root / "inputs" / str(n)
        for name in names:
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                os.link(upload.files[name], target)
            except OSError:
                shutil.copyfile(upload.files[name], target)
        upload.names |= {f"{folder}/": "", str(folder): "upload"}
    common = os.path.commonpath(names)
    display = common if common and common not in names else "."
    return StudyInput(folder, display, sha256_of(folder))
