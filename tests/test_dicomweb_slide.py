"""DICOM whole-slide images read from DICOMweb (wsidicom's DICOMweb source over medlens's session) against a
real Orthanc: the same patches as the local files, tiles fetched on demand, labels never fetched, a server
stopped mid-read -> a typed error naming the server."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc import Orthanc, config, orthanc  # noqa: F401  (the fixtures)
from slide_factory import write_dicom_wsi

from medlens.io import dicomweb
from medlens.io.dicomweb_config import ENV


class Frames:
    """Records every URL medlens's DICOMweb sessions request (wraps ``new_session``); ``before`` runs before a
    request is sent (to stop a server at a chosen moment)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, before: object = None) -> None:
        self.urls: list[str] = []
        self.lock = threading.Lock()
        original = dicomweb.new_session

        def recording(server):
            session = original(server)
            send = session.send

            def sending(request, **kwargs):
                with self.lock:
                    self.urls.append(request.url)
                if before is not None:
                    before(request.url)  # type: ignore[operator]
                return send(request, **kwargs)

            session.send = sending
            return session

        monkeypatch.setattr(dicomweb, "new_session", recording)

    def frame_urls(self) -> list[str]:
        return [u for u in self.urls if "/frames/" in u]

    def frames(self) -> int:
        """Frames asked for (a request names several: .../frames/1,2,3)."""
        return sum(len(u.rsplit("/frames/", 1)[1].split(",")) for u in self.frame_urls())


@pytest.fixture(scope="module")
def slide(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory):
    """A synthetic DICOM WSI (3 levels + a label with the fake patient's name) stored through Orthanc."""
    written = write_dicom_wsi(tmp_path_factory.mktemp("wsi") / "slide")
    orthanc.upload(list(written.files))
    study = str(pydicom.dcmread(written.files[0], stop_before_pixels=True).StudyInstanceUID)
    return written, study


def _uids(files) -> dict[str, str]:
    out = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out[Path(f).stem] = (str(ds.SOPInstanceUID), int(ds.get("NumberOfFrames", 1)))
    return out


def test_slide_from_dicomweb_gives_the_local_patches(slide, config):
    """Through the reader processes (the default): the study reference finds the slide series by itself."""
    from medlens.prep import prepare_study

    written, study = slide
    remote = prepare_study(f"dicomweb://orthanc/{study}")
    local = prepare_study(written.path)
    assert remote.family == "wsi" and remote.meta["slide"]["backend"] == "wsidicom-dicomweb"
    assert len(remote.images) == len(local.images) >= 4
    for a, b in zip(remote.images, local.images, strict=True):
        np.testing.assert_array_equal(a, b)
    assert remote.image_meta == local.image_meta  # the same patches at the same places
    np.testing.assert_array_equal(remote.overview, local.overview)


def test_tiles_are_fetched_on_demand_and_the_label_never(slide, config, monkeypatch):
    """In this process (workers=0) so that every request is counted: a handful of frame requests, far fewer
    frames than the pyramid holds, no whole-instance retrieval, nothing of the label."""
    from medlens.io.slide import find_slide
    from medlens.prep.slide_recipe import SlideOptions, prepare_slide

    written, study = slide
    uids = _uids(written.files)
    total_frames = sum(n for name, (_, n) in uids.items() if name.startswith("level-"))
    frames = Frames(monkeypatch)
    spec = find_slide(f"dicomweb://orthanc/{study}")
    series = str(pydicom.dcmread(written.files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert spec is not None and spec.path == f"dicomweb://orthanc/{study}"  # as given; the opener has the series
    assert find_slide(f"dicomweb://orthanc/{study}/{series}") is not None
    prepared = prepare_slide(spec, "medgemma-1.5", SlideOptions(workers=0))
    assert len(prepared.images) >= 4
    label_uid = uids["label"][0]
    assert not any(label_uid in u for u in frames.urls)  # neither its metadata nor its pixels
    assert not [u for u in frames.urls if re.search(r"/instances/[0-9.]+$", u)]  # no whole instance
    metadata = [u for u in frames.urls if u.endswith("/metadata")]
    assert len(metadata) == 3  # one series metadata request per open: the recipe's, the thumbnail's, the patches'
    level0 = set()
    for url in frames.frame_urls():
        if f"/instances/{uids['level-0'][0]}/frames/" in url:
            level0 |= {int(n) for n in url.rsplit("/", 1)[1].split(",")}
    tile, across = written.tile, -(-written.width // written.tile)
    under_patches = {
        row * across + col + 1
        for p in prepared.image_meta
        for row in range(p["x0_y0"][1] // tile, (p["x0_y0"][1] + p["size_level0"] - 1) // tile + 1)
        for col in range(p["x0_y0"][0] // tile, (p["x0_y0"][0] + p["size_level0"] - 1) // tile + 1)
    }
    assert level0 - {1} == under_patches - {1}  # exactly the tiles under the patches (+ frame 1: the probe)
    n_requests, n_frames = len(frames.frame_urls()), frames.frames()
    assert n_frames < total_frames / 2, (n_frames, total_frames)
    # per open one 1-tile probe per level (Orthanc's metadata does not state the transfer syntax), one request
    # per thumbnail strip (one here), one per patch
    assert n_requests == 3 * len(metadata) + 1 + len(prepared.images)


def test_cli_prepare_and_inspect_a_slide(slide, config, tmp_path, capsys):
    from medlens.cli import main

    _, study = slide
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["prepare", f"dicomweb://orthanc/{study}", "--out", str(out)])
    captured = capsys.readouterr()
    assert info.value.code in (0, None), captured.err
    assert len(list(out.glob("0*.png"))) >= 4 and (out / "overview.png").is_file()
    with pytest.raises(SystemExit) as info:
        main(["inspect", f"dicomweb://orthanc/{study}"])
    text = capsys.readouterr().out
    assert info.value.code in (0, None)
    assert "whole slide (wsidicom-dicomweb): 8192x6144 px" in text and "level 2: 512x384" in text
    assert study not in text and "DOE" not in text


def test_server_stopped_mid_read_is_a_typed_error(slide, tmp_path, monkeypatch, capsys):
    """A second Orthanc holding the slide, stopped once the thumbnail is read (before the first level-0
    tile request): exit 2, one line naming the server, no output folder."""
    from medlens.cli import main

    written, study = slide
    uids = _uids(written.files)
    server = Orthanc(tmp_path / "orthanc2").start()
    try:
        server.upload(list(written.files))
        path = tmp_path / "second.toml"
        path.write_text(server.config_toml("second"))
        monkeypatch.setenv(ENV, str(path))
        level0 = uids["level-0"][0]

        def stop_before_level0(url: str) -> None:
            patch_read = f"/instances/{level0}/frames/" in url and "," in url.rsplit("/", 1)[1]  # not the probe
            if patch_read and server.process is not None:
                server.stop()

        Frames(monkeypatch, before=stop_before_level0)
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as info:
            main(["prepare", f"dicomweb://second/{study}", "--out", str(out), "--workers", "0"])
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "DICOMweb server 'second'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.count(study) <= 1 and uids["level-0"][0] not in err  # UIDs as hashes, but for the input given
    assert not out.exists()
