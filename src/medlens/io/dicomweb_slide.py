"""DICOM whole-slide images (VL Whole Slide Microscopy, modality SM) read from a DICOMweb server.

wsidicom's DICOMweb source (``WsiDicom.open_web``) reads the pyramid, fetching tiles on demand (WADO-RS
frames, several tiles of a region in one request), through a client built on medlens's own session
(:func:`medlens.io.dicomweb.connect`: the configured auth and CA bundle, no redirects, no proxies). Two things
differ from wsidicom's stock client: the instances come from one WADO-RS series metadata request instead of
a QIDO search plus a metadata request per instance, and only the pyramid levels (ImageType VOLUME) are handed
to wsidicom, so label and overview images (which may show the patient's name) are never fetched. A failing
server raises the typed errors of :mod:`medlens.io.dicomweb_config`, naming the server.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from medlens.errors import InputError, UnsupportedInputError
from medlens.io.dicomweb import (
    WSI_MODALITY,
    DicomwebRef,
    answers,
    connect,
    parse_ref,
    search_series,
)
from medlens.io.dicomweb_config import Server, get_server
from medlens.io.slide import WSI_SOP_CLASS, DicomSlide, SlideSpec
from medlens.privacy import matches_uid, short_hash

#: DICOM JSON keys
_SOP_CLASS, _SOP_INSTANCE, _IMAGE_TYPE, _TRANSFER_SYNTAX = "00080016", "00080018", "00080008", "00020010"
#: the only image type handed to wsidicom: pyramid levels (never LABEL, OVERVIEW or THUMBNAIL)
PYRAMID_IMAGE_TYPE = "VOLUME"


def _value(item: dict, tag: str, index: int = 0) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[index] if len(values) > index else None


def _client_class() -> type:
    """The WsiDicomWebClient subclass (built here: wsidicom is imported only when a slide is read)."""
    from wsidicom import WsiDicomWebClient

    class PyramidClient(WsiDicomWebClient):
        """wsidicom's client over a configured server: pyramid levels only, metadata from one series request,
        every frame request counted and its failures typed."""

        def __init__(self, server: Server, source: str) -> None:
            super().__init__(connect(server))
            self.server, self.source = server, source
            self.frame_requests = 0
            self.frames = 0
            self._datasets: dict[str, dict] = {}
            self._lock = threading.Lock()

        def get_wsi_instances(self, study_uid: Any, series_uids: Iterable[Any]) -> Iterator[tuple[Any, Any, Any]]:
            from pydicom.uid import UID

            found = []
            for series_uid in series_uids:
                what = f"the metadata of slide series {short_hash(str(series_uid))} (WADO-RS)"
                with answers(self.server, what, self.source):
                    items = self._client.retrieve_series_metadata(str(study_uid), str(series_uid))
                    if not isinstance(items, list):
                        raise ValueError("not a list")
                    for item in items:
                        if not isinstance(item, dict) or _value(item, _SOP_CLASS) != WSI_SOP_CLASS:
                            continue
                        if _value(item, _IMAGE_TYPE, 2) != PYRAMID_IMAGE_TYPE:
                            continue  # labels and overviews are never fetched
                        sop = str(_value(item, _SOP_INSTANCE))
                        self._datasets[sop] = item
                        syntax = _value(item, _TRANSFER_SYNTAX)
                        found.append((UID(str(series_uid)), UID(sop), {UID(syntax)} if syntax else None))
            return iter(found)

        def get_annotation_instances(self, study_uid: Any, series_uids: Iterable[Any]) -> Iterator[Any]:
            return iter(())  # annotations are not read

        def get_instance(self, study_uid: Any, series_uid: Any, instance_uid: Any) -> Any:
            import warnings

            from pydicom import Dataset

            item = self._datasets[str(instance_uid)]
            with warnings.catch_warnings():  # bulk data (the pixels) is left out, which pydicom warns about
                warnings.simplefilter("ignore")
                return Dataset.from_json(item)

        def get_frames(
            self, study_uid: Any, series_uid: Any, instance_uid: Any, frame_indices: list[int], transfer_syntax: Any
        ) -> Iterator[bytes]:
            with self._lock:
                self.frame_requests += 1
                self.frames += len(frame_indices)
            what = f"{len(frame_indices)} tile(s) of slide instance {short_hash(str(instance_uid))} (WADO-RS)"
            with answers(self.server, what, self.source):
                yield from super().get_frames(study_uid, series_uid, instance_uid, frame_indices, transfer_syntax)

    return PyramidClient


class DicomwebSlide(DicomSlide):
    """A DICOM WSI on a DICOMweb server: the pyramid through wsidicom's DICOMweb source, tiles on demand.
    Errors name it ``dicomweb://SERVER/<study hash>/<series hash>``."""

    backend = "wsidicom-dicomweb"

    def __init__(self, ref: DicomwebRef, server: Server) -> None:
        from wsidicom import WsiDicom

        assert ref.series is not None
        display = f"dicomweb://{ref.server}/{short_hash(ref.study)}/{short_hash(ref.series)}"
        self.client = _client_class()(server, display)
        self._attach(display, lambda: WsiDicom.open_web(self.client, ref.study, ref.series))


@dataclass(frozen=True)
class DicomwebSlideOpener:
    """Opens the slide series ``series`` of a ``dicomweb://SERVER/STUDY[/SERIES]`` reference, here or again in a
    reader process (picklable: the server's settings travel with it, so a worker needs neither the config
    file nor its environment)."""

    server: Server
    series: str

    def __call__(self, path: str, backend: str | None = None, files: Any = None) -> DicomwebSlide:
        return open_remote_slide(path, backend, self.server, self.series)


def open_remote_slide(
    path: str, backend: str | None = None, server: Server | None = None, series: str | None = None
) -> DicomwebSlide:
    """The slide series ``series`` (default: the one the reference names) of ``dicomweb://SERVER/STUDY[/SERIES]``."""
    ref = parse_ref(path)
    series = series or ref.series
    if series is None:
        raise InputError("a slide on DICOMweb is opened by its series: dicomweb://SERVER/STUDY/SERIES", path)
    if backend not in (None, "wsidicom", DicomwebSlide.backend):
        raise UnsupportedInputError(f"a slide on DICOMweb is read by wsidicom, not {backend}", path)
    return DicomwebSlide(DicomwebRef(ref.server, ref.study, series), server or get_server(ref.server))


def find_remote_slide(path: str) -> SlideSpec | None:
    """A :class:`SlideSpec` when the referenced series is a whole slide (modality SM), or when the study's
    image series are all slides (one of them), else ``None`` (an ordinary study, read by io/dicomweb.py)."""
    from medlens.io.dicom_header import NON_IMAGE_MODALITIES

    ref = parse_ref(path)
    server = get_server(ref.server)  # an unconfigured name fails here, before any connection
    listed = search_series(connect(server), server, ref)
    if ref.series:
        named = [s for s in listed if matches_uid(s.uid, ref.series)]
        slides = [s for s in named if s.modality == WSI_MODALITY]
    else:
        images = [s for s in listed if s.modality not in NON_IMAGE_MODALITIES]
        slides = [s for s in images if s.modality == WSI_MODALITY]
        if len(slides) < len(images):
            return None
    if not slides:
        return None
    if len(slides) > 1:
        raise UnsupportedInputError(
            f"the study holds {len(slides)} slide series; give one as dicomweb://{ref.server}/STUDY/SERIES", path
        )
    return SlideSpec(str(ref), opener=DicomwebSlideOpener(server, slides[0].uid))


def describe_remote_slide(ref: DicomwebRef, series_uid: str) -> list[str]:
    """``medlens inspect`` lines of a slide series: its pyramid, as for a local slide."""
    with open_remote_slide(str(ref), series=series_uid) as slide:
        info = slide.summary()
    lines = [
        f"{short_hash(series_uid)} SM whole slide ({info['backend']}): {info['width']}x{info['height']} px, "
        f"mpp {info['mpp']}, objective {info['objective_power']}  [ok]"
    ]
    for i, level in enumerate(info["levels"]):
        mag = f"{level['magnification']:.3g}x" if level["magnification"] else "magnification unknown"
        lines.append(f"  level {i}: {level['width']}x{level['height']}, downsample {level['downsample']:g}, {mag}")
    return lines


__all__ = ["DicomwebSlide", "DicomwebSlideOpener", "describe_remote_slide", "find_remote_slide", "open_remote_slide"]
