"""``write_prepared``: lossless fast PNGs, and an output folder that is never stale (temp folder + swap)."""

from __future__ import annotations

import io
import json

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from medlens.errors import OutputFolderError
from medlens.prep import study
from medlens.prep.prepared import Prepared
from medlens.prep.study import encode_png, write_prepared


def _prepared(n: int, seed: int) -> Prepared:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (37 + i, 53, 3), dtype=np.uint8) for i in range(n)]
    prep = Prepared.__new__(Prepared)
    prep.images, prep.overview = images, None
    prep.manifest = lambda names: {"recipe": "r", "images": [{"file": f} for f in names], "warnings": []}
    return prep


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 300, 3), (512, 512, 3)])
def test_png_is_lossless_for_every_reader(shape):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    image[: shape[0] // 2] = 0  # runs and noise both
    data = encode_png(image)
    assert np.array_equal(imagecodecs.png_decode(data), image)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), image)


def test_new_folder_gets_images_and_manifest(tmp_path):
    prep = _prepared(3, 0)
    manifest = write_prepared(prep, tmp_path / "out")
    data = json.loads(manifest.read_text())
    assert data["written_by"] == study.WRITTEN_BY and [i["file"] for i in data["images"]] == [
        "0001.png",
        "0002.png",
        "0003.png",
    ]
    for entry, image in zip(data["images"], prep.images, strict=True):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / entry["file"])), image)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_earlier_prepare_needs_overwrite_and_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    write_prepared(_prepared(5, 1), out)
    with pytest.raises(OutputFolderError, match="--overwrite") as err:
        write_prepared(_prepared(2, 2), out)
    assert str(out) in str(err.value) and len(list(out.glob("*.png"))) == 5
    new = _prepared(2, 2)
    write_prepared(new, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["0001.png", "0002.png", "manifest.json"]  # no stale 0003-5
    assert np.array_equal(np.asarray(Image.open(out / "0002.png")), new.images[1])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_folder_with_other_files_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "out"
    write_prepared(_prepared(2, 3), out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="did not write"):
        write_prepared(_prepared(1, 4), out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "0002.png").exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.png").write_bytes(b"x")
    with pytest.raises(OutputFolderError):
        write_prepared(_prepared(1, 4), plain, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="not a folder"):
        write_prepared(_prepared(1, 4), tmp_path / "file")


def test_empty_folder_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    write_prepared(_prepared(1, 5), tmp_path / "out")
    assert (tmp_path / "out" / "0001.png").exists()


def test_crash_mid_write_leaves_the_old_folder_intact(tmp_path, monkeypatch):
    out = tmp_path / "out"
    old = _prepared(3, 6)
    write_prepared(old, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing(image):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return encode_png(image)

    monkeypatch.setattr(study, "encode_png", failing)
    with pytest.raises(OSError, match="disk full"):
        write_prepared(_prepared(4, 7), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_files_the_manifest_names_count_as_medlens_own(tmp_path):
    out = tmp_path / "out"
    prep = _prepared(1, 8)
    base = prep.manifest
    prep.manifest = lambda names: {**base(names), "summary": "summary.txt"}
    write_prepared(prep, out)
    (out / "summary.txt").write_text("text the model gets")  # written beside, as prepare does for records
    write_prepared(_prepared(1, 9), out, overwrite=True)
    assert not (out / "summary.txt").exists()


def test_texts_are_written_with_the_images_and_replaced_with_them(tmp_path):
    out = tmp_path / "out"
    write_prepared(_prepared(2, 0), out, texts={"summary.txt": "first\n"})
    assert (out / "summary.txt").read_text() == "first\n"
    assert json.loads((out / "manifest.json").read_text())["texts"] == ["summary.txt"]
    write_prepared(_prepared(1, 1), out, overwrite=True)  # summary.txt is medlens's own: replaced, not kept
    assert sorted(p.name for p in out.iterdir()) == ["0001.png", "manifest.json"]
