"""Studies from a DICOMweb server (a PACS such as Orthanc): ``dicomweb://SERVER/STUDY_UID[/SERIES_UID]``.

QIDO-RS lists the study's series; WADO-RS series metadata builds, orders and validates the whole series
exactly as the local reader does (io/dicom_series.py); only the instances the recipe then loads are
retrieved (WADO-RS), several at once, into a private cache folder (0700) under a size cap. The retrieved
subset has uneven gaps by construction, so it is never re-validated as a series. Only servers named in the
configuration (io/dicomweb_config.py) are contacted; redirects are not followed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import InputError, MedlensError, NoImagesFoundError, TooLargeError, UnsupportedInputError
from medlens.io.dicomweb_config import (
    DicomwebError,
    RemoteNotFoundError,
    Server,
    ServerRefusedError,
    ServerResponseError,
    ServerUnavailableError,
    get_server,
)
from medlens.io.types import ImageStack
from medlens.privacy import matches_uid, short_hash
from medlens.progress import Update as Progress
from medlens.registry import Registry

SCHEME = "dicomweb:"
#: pixel data elements: their presence in the metadata says the instance has pixels; never fetched as bulk data
_PIXEL_KEYS = ("7FE00010", "7FE00008", "7FE00009")
#: QIDO-RS attribute tags (DICOM JSON keys)
#: VL Whole Slide Microscopy: read through wsidicom's DICOMweb source (io/dicomweb_slide.py), not here
WSI_MODALITY = "SM"
_SERIES_UID, _MODALITY, _COUNT, _DESCRIPTION, _NUMBER = "0020000E", "00080060", "00201209", "0008103E", "00200011"


@dataclass(frozen=True)
class DicomwebRef:
    """A parsed ``dicomweb://SERVER/STUDY[/SERIES]`` reference."""

    server: str
    study: str
    series: str | None = None

    def __str__(self) -> str:
        return f"dicomweb://{self.server}/{self.study}" + (f"/{self.series}" if self.series else "")


def is_dicomweb(source: str | Path) -> bool:
    """Whether ``source`` is a dicomweb:// reference (also in the ``dicomweb:/`` form a Path makes of it)."""
    return str(source).startswith(SCHEME)


def parse_ref(source: str | Path) -> DicomwebRef:
    """``dicomweb://SERVER/STUDY_UID[/SERIES_UID]`` -> its parts; :class:`DicomwebError` when malformed."""
    text = str(source)
    if not is_dicomweb(text):
        raise DicomwebError("not a dicomweb:// reference", text)
    parts = [p for p in text[len(SCHEME) :].lstrip("/").split("/") if p]
    if len(parts) not in (2, 3) or any(not _uid_like(p) for p in parts[1:]):
        raise DicomwebError("expected dicomweb://SERVER/STUDY_UID or dicomweb://SERVER/STUDY_UID/SERIES_UID", text)
    return DicomwebRef(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def _uid_like(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isdigit() or c == "." for c in value)


# ---------------------------------------------------------------- connections


def new_session(server: Server) -> Any:
    """A requests session for ``server``: its auth and CA bundle, redirects refused."""
    import requests

    session = requests.Session()
    session.max_redirects = 0  # a redirect raises TooManyRedirects: never followed
    session.trust_env = False  # no proxies or .netrc credentials from the environment
    # pixel data compresses poorly; gzip on the server costs ~30 ms per 0.5 MB instance (Orthanc compresses
    # whenever asked, and requests asks by default)
    session.headers["Accept-Encoding"] = "identity"
    if server.auth == "basic":
        session.auth = (server.username or "", server.secret or "")
    elif server.auth == "bearer":
        session.headers["Authorization"] = f"Bearer {server.secret}"
    if server.ca_bundle:
        session.verify = server.ca_bundle
    return session


def connect(server: Server) -> Any:
    """A dicomweb-client ``DICOMwebClient`` for ``server`` (no retries: a failure is reported at once)."""
    import logging

    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise DicomwebError(
            "reading from DICOMweb needs the dicomweb-client package (pip install dicomweb-client)",
            f"dicomweb://{server.name}",
        ) from None

    logging.getLogger("dicomweb_client").setLevel(logging.CRITICAL)  # its messages carry URLs with UIDs
    client = DICOMwebClient(server.url, session=new_session(server), timeout=server.timeout)
    client.set_http_retry_params(retry=False)
    return client


@contextlib.contextmanager
def answers(server: Server, what: str, source: str) -> Iterator[None]:
    """Turn what the HTTP stack or a garbage answer raises into a typed error naming the server (never the
    URL, which may carry UIDs, nor any credentials)."""
    import requests
    from pydicom.errors import InvalidDicomError

    name = f"DICOMweb server {server.name!r}"
    try:
        yield
    except MedlensError:
        raise
    except requests.exceptions.TooManyRedirects:
        raise ServerRefusedError(
            f"{name} answered {what} with a redirect (redirects are not followed)", source
        ) from None
    except requests.exceptions.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else None
        if code in (401, 403):
            why = f"{name} refused {what}: HTTP {code} (check the username and password/token in the config)"
            raise ServerRefusedError(why, source) from None
        if code == 404:
            raise RemoteNotFoundError(f"{name} does not have {what} (HTTP 404)", source) from None
        raise ServerResponseError(f"{name} failed {what}: HTTP {code}", source) from None
    except requests.exceptions.InvalidJSONError as exc:
        why = f"{name} sent an answer to {what} that is not valid DICOMweb ({type(exc).__name__})"
        raise ServerResponseError(why, source) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise ServerUnavailableError(f"cannot reach {name} for {what} ({type(exc).__name__})", source) from None
    except requests.exceptions.RequestException as exc:
        raise ServerUnavailableError(f"{name} failed {what} ({type(exc).__name__})", source) from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, EOFError, InvalidDicomError) as exc:
        why = f"{name} sent an answer to {what} that is not valid DICOMweb ({type(exc).__name__})"
        raise ServerResponseError(why, source) from None


# ---------------------------------------------------------------- QIDO-RS and metadata


@dataclass(frozen=True)
class RemoteSeries:
    """A series as QIDO-RS lists it."""

    uid: str
    modality: str
    count: int | None
    description: str
    number: int | None


def _value(item: dict, tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def search_series(client: Any, server: Server, ref: DicomwebRef) -> list[RemoteSeries]:
    """The study's series (QIDO-RS); NoImagesFoundError when it has none."""
    with answers(server, "the series search (QIDO-RS)", str(ref)):
        found = client.search_for_series(study_instance_uid=ref.study)
        if not isinstance(found, list):
            raise ValueError("not a list")
        out = []
        for item in found:
            uid = _value(item, _SERIES_UID)
            if not isinstance(uid, str):
                raise ValueError("series without SeriesInstanceUID")
            count, number = _value(item, _COUNT), _value(item, _NUMBER)
            out.append(
                RemoteSeries(
                    uid=uid,
                    modality=str(_value(item, _MODALITY) or "OT").upper(),
                    count=int(count) if count is not None else None,
                    description=str(_value(item, _DESCRIPTION) or ""),
                    number=int(number) if number is not None else None,
                )
            )
    if not out:
        raise RemoteNotFoundError(f"study not found on DICOMweb server {server.name!r} (no series)", str(ref))
    return out


def series_instances(client: Any, server: Server, ref: DicomwebRef, series_uid: str, skipped: list[InputError]):
    """The series' instances from WADO-RS metadata, as header-only DicomInstances (no pixels fetched)."""
    from medlens.io.dicom_header import instance_from_metadata

    convert = _Converter()
    with answers(server, f"the metadata of series {short_hash(series_uid)} (WADO-RS)", str(ref)):
        items = client.retrieve_series_metadata(ref.study, series_uid)
        if not isinstance(items, list):
            raise ValueError("not a list")
        out = []
        for n, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValueError("metadata item is not an object")
            has_pixels = any(k in item for k in _PIXEL_KEYS)
            # bulk data (pixels, large private elements) is not fetched for the metadata; without a handler
            # pydicom leaves nested bulk elements empty (a handler would cost an inspect per element)
            kept = {k: v for k, v in item.items() if k not in _PIXEL_KEYS and "BulkDataURI" not in v}
            ds = convert(kept)
            sop = str(ds.get("SOPInstanceUID", "") or f"item{n}")
            display = f"dicomweb://{server.name}/{short_hash(ref.study)}/{short_hash(series_uid)}/{short_hash(sop)}"
            try:
                out.append(instance_from_metadata(ds, display, has_pixels))
            except InputError as exc:
                skipped.append(exc)
    return out


class _Converter:
    """DICOM JSON -> pydicom Datasets. Most of a series' header is the same on every instance: an element
    whose JSON equals the one already converted is shared (read only), not converted again (3x faster)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Any, Any]] = {}  # JSON key -> (its JSON value, the DataElement)

    def __call__(self, item: dict[str, Any]) -> Any:
        from pydicom import Dataset

        ds = Dataset()
        new = {}
        for key, value in item.items():
            seen = self._seen.get(key)
            if seen is not None and seen[0] == value:
                ds.add(seen[1])
            else:
                new[key] = value
        if new:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fresh = Dataset.from_json(new)
            for key, value in new.items():
                tag = int(key, 16)
                if tag in fresh:
                    element = fresh[tag]
                    ds.add(element)
                    self._seen[key] = (value, element)
        return ds


def candidates(
    client: Any,
    server: Server,
    ref: DicomwebRef,
    wanted: str | None,
    skipped: list[InputError],
    slides_ok: bool = False,
):
    """The series to choose from, built from metadata: only the named one when a series was given (in the
    reference or ``--series``), else every series with images (QIDO's Modality excludes SR, SEG ...)."""
    from medlens.io.dicom_header import NON_IMAGE_MODALITIES
    from medlens.io.dicom_series import build_series

    listed = search_series(client, server, ref)
    wanted = ref.series or wanted
    if wanted:
        chosen = [s for s in listed if matches_uid(s.uid, wanted)] or listed  # choose_series names the miss
        if len(chosen) < len(listed):
            listed = chosen[:1]
    listed = [s for s in listed if s.modality not in NON_IMAGE_MODALITIES] or listed
    slides = [s for s in listed if s.modality == WSI_MODALITY]
    listed = [s for s in listed if s.modality != WSI_MODALITY]
    if slides and not listed and not slides_ok:  # a slide named by --series in a study with other series
        raise UnsupportedInputError(
            f"series {short_hash(slides[0].uid)} is a whole slide, read by the slide recipe: give it in the "
            f"reference, dicomweb://{ref.server}/STUDY_UID/SERIES_UID",
            str(ref),
        )
    instances = [inst for s in listed for inst in series_instances(client, server, ref, s.uid, skipped)]
    return build_series(instances), wanted


# ---------------------------------------------------------------- reading


def read_dicomweb(source: str | Path, series: str | None = None, progress: Progress | None = None) -> ImageStack:
    """The chosen series of a DICOMweb study as an ImageStack whose loader retrieves only the instances of
    the slices it is asked for."""
    from medlens.io.dicom import skipped_summary
    from medlens.io.dicom_series import choose_series, to_stack

    ref = parse_ref(source)
    server = get_server(ref.server)  # an unconfigured name fails here, before any connection
    client = connect(server)
    skipped: list[InputError] = []
    cands, wanted = candidates(client, server, ref, series, skipped)
    if not cands:
        why = f"no readable images ({skipped_summary(skipped)})" if skipped else "no images in the study"
        raise NoImagesFoundError(why, str(ref))
    chosen = choose_series(cands, wanted, str(ref))
    stack = to_stack(chosen, str(ref))
    fetcher = Fetcher(server, str(ref))
    entries = chosen.entries
    stack.loader = lambda idx: fetcher.decode([entries[i] for i in idx], chosen.is_color)
    stack.keepalive = fetcher  # holds the temporary cache folder as long as the stack can load
    stack.prefetch = lambda idx: fetcher.prefetch([entries[i] for i in idx])
    if skipped:
        stack.notes.append(skipped_summary(skipped))
    if progress:
        progress(1, 1)
    return stack


#: what WADO-RS instance retrieval asks for: the stored file in whatever transfer syntax it has
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def single_part(body: bytes, content_type: str) -> bytes:
    """The content of a one-part ``multipart/related`` answer (RFC 2046 framing); a bare ``application/dicom``
    answer as it is. ValueError when the framing is wrong or there is more than one part."""
    from email.message import Message

    header = Message()
    header["Content-Type"] = content_type
    if header.get_content_maintype() != "multipart":
        if header.get_content_type() == "application/dicom":
            return body
        raise ValueError(f"unexpected content type {header.get_content_type()}")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ValueError("multipart answer without a boundary")
    delimiter = b"--" + boundary.encode("ascii")
    start = body.find(delimiter)
    head_end = body.find(b"\r\n\r\n", start) if start >= 0 else -1
    end = body.find(b"\r\n" + delimiter, head_end) if head_end >= 0 else -1
    if end < 0:
        raise ValueError("malformed multipart answer")
    if not body.startswith(b"--", end + 2 + len(delimiter)):
        raise ValueError("more than one part where one instance was asked for")
    return body[head_end + 4 : end]


def _expected_bytes(inst: Any) -> int:
    bits = int(inst.dataset.get("BitsAllocated", 16) or 16)
    return inst.rows * inst.columns * inst.n_frames * inst.samples_per_pixel * max(bits, 8) // 8 + 4096


@dataclass
class Fetcher:
    """Retrieves instances (WADO-RS) into a private cache folder, in parallel, under the size cap; each file
    is written under a temporary name and renamed when complete, so a failure leaves nothing half-written."""

    server: Server
    source: str
    retrieved: int = 0
    _files: dict[str, Any] = field(default_factory=dict)  # SOPInstanceUID -> DicomInstance read from the file
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.session = new_session(self.server)
        self._tmp: tempfile.TemporaryDirectory | None = None
        if self.server.cache_dir:
            self.folder = Path(self.server.cache_dir)
            try:
                self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.chmod(self.folder, 0o700)
            except OSError as exc:
                raise DicomwebError(f"cannot use cache_dir ({exc.strerror or exc})", str(self.folder)) from None
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="medlens-dicomweb-")  # mkdtemp: mode 0700
            self.folder = Path(self._tmp.name)
        self.cap = int(self.server.cache_max_mb * 2**20)

    def path_for(self, sop: str) -> Path:
        return self.folder / (hashlib.sha256(f"{self.server.name}\0{sop}".encode()).hexdigest()[:32] + ".dcm")

    def prefetch(self, entries: Sequence[Any]) -> None:
        """Retrieve the instances ``entries`` need that are not here yet, all at once (``server.parallel`` at a
        time): the recipe hands its whole sample over before decoding it a chunk at a time, so the retrievals
        are not cut into chunk-sized rounds (bench/dicomweb_fetch.py: 1.6-1.9x -> 2.0-2.1x against the whole
        series; retrieving in the background while decoding was measured slower here, 1.39 s against 1.03 s)."""
        needed = {e.instance.sop_instance_uid: e.instance for e in entries}
        self.fetch([inst for sop, inst in needed.items() if sop not in self._files])

    def decode(self, entries: Sequence[Any], color: bool) -> np.ndarray:
        """Retrieve what ``entries`` need and decode them as the local reader would."""
        from medlens.io.dicom_pixels import FrameEntry, decode

        self.prefetch(entries)
        local = [self._files[e.instance.sop_instance_uid] for e in entries]
        return decode(
            [FrameEntry(f, e.frame, f.frames[e.frame or 0]) for f, e in zip(local, entries, strict=True)], color
        )

    def fetch(self, wanted: Sequence[Any]) -> None:
        """Retrieve ``wanted`` instances, ``server.parallel`` at a time."""
        if not wanted:
            return
        self._make_room(sum(_expected_bytes(i) for i in wanted), {self.path_for(i.sop_instance_uid) for i in wanted})
        with ThreadPoolExecutor(max_workers=min(self.server.parallel, len(wanted))) as pool:
            futures = [pool.submit(self._one, inst) for inst in wanted]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def _one(self, meta: Any) -> None:
        from medlens.io.dicom_header import read_instance

        sop = meta.sop_instance_uid
        target = self.path_for(sop)
        what = f"instance {short_hash(sop)} (WADO-RS)"
        if not target.is_file():
            body = self._retrieve(meta, what)
            part = target.with_name(f".{target.name}.{threading.get_ident()}.part")
            try:
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(body)
                os.replace(part, target)
            except OSError as exc:
                raise DicomwebError(
                    f"cannot write the DICOMweb cache ({exc.strerror or exc})", str(self.folder)
                ) from None
            finally:
                part.unlink(missing_ok=True)
        try:
            inst = read_instance(target, meta.display)
        except InputError as exc:
            target.unlink(missing_ok=True)
            why = f"DICOMweb server {self.server.name!r} sent {what} that cannot be read ({exc.reason})"
            raise ServerResponseError(why, self.source) from None
        facts = (inst.sop_instance_uid, inst.rows, inst.columns, inst.n_frames)
        if facts != (sop, meta.rows, meta.columns, meta.n_frames):
            target.unlink(missing_ok=True)
            why = f"DICOMweb server {self.server.name!r} sent {what} unlike its metadata (UID, size or frames)"
            raise ServerResponseError(why, self.source)
        with self._lock:
            self._files[sop] = inst
            self.retrieved += 1

    def _retrieve(self, meta: Any, what: str) -> bytes:
        """The instance's Part 10 bytes (WADO-RS, any transfer syntax), streamed under a size limit and taken
        out of their one-part multipart/related answer."""
        ids = (meta.study_uid, meta.series_uid, meta.sop_instance_uid)
        if not all(_uid_like(uid) for uid in ids):  # the UIDs came from the server: never a path of its choice
            raise ServerResponseError(f"DICOMweb server {self.server.name!r} listed a malformed UID", self.source)
        url = f"{self.server.url}/studies/{ids[0]}/series/{ids[1]}/instances/{ids[2]}"
        limit = 2 * _expected_bytes(meta) + 2**20
        headers = {"Accept": ACCEPT_DICOM}
        timeout = self.server.timeout
        with (
            answers(self.server, what, self.source),
            self.session.get(url, headers=headers, stream=True, timeout=timeout) as r,
        ):
            r.raise_for_status()
            body = bytearray()
            for chunk in r.iter_content(1 << 16):
                body += chunk
                if len(body) > limit:
                    raise ServerResponseError(
                        f"DICOMweb server {self.server.name!r} sent more for {what} than its metadata allows "
                        f"({limit:,} bytes)",
                        self.source,
                    )
            return single_part(bytes(body), r.headers.get("Content-Type", ""))

    def _make_room(self, needed: int, keep: set[Path]) -> None:
        """Keep the cache under ``cache_max_mb``: evict the oldest other files, else refuse."""
        if needed > self.cap:
            raise TooLargeError(
                f"the instances to retrieve need {needed / 2**20:,.0f} MB, over the cache cap (cache_max_mb)",
                self.source,
            )
        mine = {self.path_for(s) for s in self._files}
        files = sorted((p for p in self.folder.glob("*.dcm") if p not in keep), key=lambda p: p.stat().st_mtime)
        used = sum(p.stat().st_size for p in files)
        for old in files:
            if used + needed <= self.cap:
                break
            if old in mine:
                continue
            used -= old.stat().st_size
            old.unlink(missing_ok=True)
        if used + needed > self.cap:
            raise TooLargeError("the DICOMweb cache is full (cache_max_mb)", self.source)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# ---------------------------------------------------------------- inspect and STOW-RS


#: modality -> "module:function(ref, series_uid) -> lines" for series not read as image stacks (module:attr,
#: imported when used: io/dicomweb_slide.py builds on this module)
SERIES_DESCRIBERS: Registry[str] = Registry("DICOMweb series describer")
SERIES_DESCRIBERS.add(WSI_MODALITY, "medlens.io.dicomweb_slide:describe_remote_slide")


def describe_dicomweb(source: str | Path) -> list[str]:
    """``medlens inspect`` of a DICOMweb study: every series as QIDO-RS lists it, and for image series the
    same summary the local reader prints, built from metadata."""
    ref = parse_ref(source)
    server = get_server(ref.server)
    client = connect(server)
    skipped: list[InputError] = []
    cands, _ = candidates(client, server, ref, None, skipped, slides_ok=True)
    lines = [f"{c.summary()}  [{'ok' if not c.problems else 'not usable: ' + c.problems[0]}]" for c in cands]
    built = {c.uid for c in cands}
    for s in search_series(client, server, ref):
        if s.modality in SERIES_DESCRIBERS:
            module, attr = SERIES_DESCRIBERS.get(s.modality).split(":")
            lines += getattr(importlib.import_module(module), attr)(ref, s.uid)
        elif s.uid not in built:
            lines.append(f"{short_hash(s.uid)} {s.modality} {s.count or '?'} instance(s)  [not an image series]")
    return lines


def header_datasets(source: str | Path) -> list[Any]:
    """The headers (pydicom Datasets, no pixels) of every instance of the referenced series, or of every series
    of the study, from WADO-RS metadata: what an SR needs to join its source study."""
    ref = parse_ref(source)
    server = get_server(ref.server)
    client = connect(server)
    series = [ref.series] if ref.series else [s.uid for s in search_series(client, server, ref)]
    skipped: list[InputError] = []
    return [inst.dataset for uid in series for inst in series_instances(client, server, ref, uid, skipped)]


def store(server: str | Server, datasets: Sequence[Any], study_uid: str | None = None) -> Any:
    """Store pydicom ``datasets`` on a configured server (STOW-RS); returns the server's answer (a pydicom
    Dataset). Typed errors as for reading; :class:`ServerResponseError` when the server rejects any instance."""
    target = server if isinstance(server, Server) else get_server(server)
    if not datasets:
        raise DicomwebError("nothing to store", f"dicomweb://{target.name}")
    client = connect(target)
    where = f"dicomweb://{target.name}"
    with answers(target, "the store (STOW-RS)", where):
        answer = client.store_instances(list(datasets), study_instance_uid=study_uid)
        failed = answer.get("FailedSOPSequence") or []
    if failed:
        reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
        why = f"DICOMweb server {target.name!r} rejected {len(failed)} of {len(datasets)} instance(s)"
        why += f" (failure reason {', '.join(reasons)})"
        raise ServerResponseError(why, where)
    return answer


__all__ = [
    "DicomwebRef",
    "Fetcher",
    "describe_dicomweb",
    "header_datasets",
    "is_dicomweb",
    "parse_ref",
    "read_dicomweb",
    "store",
]
