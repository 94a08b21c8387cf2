"""Every file of pydicom's test data and of the pydicom-data package either prepares or fails with a typed
medlens error (never a crash), in bounded time; lossless encodings decode to the same images."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import pydicom_data_dir, pydicom_test_dir

from medlens.api import prepare_study
from medlens.errors import (
    ImageTooSmallError,
    InconsistentSeriesError,
    InputError,
    NoImageDataError,
    SeriesSelectionError,
    TooLargeError,
)


def _corpus() -> list:
    roots = [pydicom_test_dir(), pydicom_data_dir()]
    files = [p for root in roots if root is not None for p in sorted(root.rglob("*")) if p.is_file()]
    return [pytest.param(p, id=f"{p.parent.name}/{p.name}") for p in files if p.suffix != ".pyc"]


CORPUS = _corpus()

#: files that hold ordinary images and must prepare (guards against a reader that rejects everything)
MUST_PREPARE = {
    "CT_small.dcm": ("ct", 1),
    "MR_small.dcm": ("mr", 1),
    "MR_small_RLE.dcm": ("mr", 1),
    "MR_small_bigendian.dcm": ("mr", 1),
    "MR_small_implicit.dcm": ("mr", 1),
    "MR_small_jp2klossless.dcm": ("mr", 1),
    "MR_small_jpeg_ls_lossless.dcm": ("mr", 1),
    "JPEG2000.dcm": ("mr", 1),
    "JPGExtended.dcm": ("mr", 1),
    "emri_small.dcm": ("mr", 10),
    "SC_rgb_rle.dcm": ("color", 1),
    "SC_rgb_jpeg_gdcm.dcm": ("color", 1),
    "RG1_UNCR.dcm": ("radiograph", 1),
    "RG1_J2KR.dcm": ("radiograph", 1),
    "RG3_J2KI.dcm": ("radiograph", 1),
    "MR2_J2KR.dcm": ("mr", 1),
    "US1_J2KR.dcm": ("color", 1),
    "eCT_Supplemental.dcm": ("ct", 2),
    "examples_palette.dcm": ("color", 1),
    # "OBXXXX1A_rle_2frame.dcm" is a 2-frame ultrasound clip: refused as not a volume since issue 11 (item 4),
    # see tests/test_multiframe_layouts.py
    # pydicom decodes these; medlens refused them with a decoding error until issue 11 (item 3)
    "image_dfl.dcm": ("radiograph", 1),  # deflated transfer syntax
    "SC_rgb_jpeg.dcm": ("color", 1),  # basic offset table that the path-based decoder rejects
}


#: typed refusals that are not "cannot decode": a file pydicom decodes may only be refused for these
#: reasons (documented in docs/recipe.md, "Skipped objects")
NON_DECODING_REFUSALS = (
    NoImageDataError,  # SEG, RTDOSE, SR ...: pixels that are not a picture of the patient
    ImageTooSmallError,  # under 16x16 pixels
    TooLargeError,  # over the decoding memory budget, checked from the header
    InconsistentSeriesError,  # frames that cannot be one volume
    SeriesSelectionError,  # several studies in one input
)


@functools.cache
def pydicom_decodes(path: Path) -> bool:
    """Whether pydicom itself decodes the file's pixels with the installed plugins (cached per session)."""
    import warnings

    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.dcmread(path).pixel_array  # noqa: B018
    except Exception:
        return False
    return True


@pytest.mark.parametrize("path", CORPUS)
def test_file_prepares_or_fails_typed(path):
    start = time.perf_counter()
    decodable = pydicom_decodes(path)
    try:
        prepared = prepare_study(path)
    except InputError as exc:
        assert exc.path and str(path.name) in exc.path, "the error names the file"
        assert path.name not in MUST_PREPARE, f"{path.name} should prepare: {exc}"
        if decodable:
            assert isinstance(exc, NON_DECODING_REFUSALS), f"pydicom decodes {path.name}, medlens refused: {exc}"
        return
    finally:
        assert time.perf_counter() - start < 60
    assert prepared.images, "at least one image"
    for img in prepared.images:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    if path.name in MUST_PREPARE:
        family, n = MUST_PREPARE[path.name]
        assert (prepared.family, len(prepared.images)) == (family, n)


def test_must_prepare_files_are_present():
    names = {p.values[0].name for p in CORPUS}
    assert {"CT_small.dcm", "MR_small.dcm"} <= names
    if pydicom_data_dir() is not None:
        assert set(MUST_PREPARE) <= names


@pytest.mark.parametrize(
    ("reference", "variants"),
    [
        (
            "MR_small.dcm",
            [
                "MR_small_RLE.dcm",
                "MR_small_jp2klossless.dcm",
                "MR_small_jpeg_ls_lossless.dcm",
                "MR_small_bigendian.dcm",
                "MR_small_implicit.dcm",
            ],
        ),
        ("RG1_UNCR.dcm", ["RG1_J2KR.dcm"]),
        ("MR2_UNCR.dcm", ["MR2_J2KR.dcm"]),
        ("US1_UNCR.dcm", ["US1_J2KR.dcm"]),
        ("emri_small.dcm", ["emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm", "emri_small_big_endian.dcm"]),
    ],
)
def test_lossless_encodings_prepare_identically(pydicom_file, reference, variants):
    expected = prepare_study(pydicom_file(reference)).images
    for name in variants:
        got = prepare_study(pydicom_file(name)).images
        assert len(got) == len(expected)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True)), name


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("MR_truncated.dcm", "CorruptFileError"),
        ("rtdose.dcm", "NoImageDataError"),
        ("test-SR.dcm", "NoImageDataError"),
        ("liver.dcm", "NoImageDataError"),  # a SEG object
        ("SC_rgb_small_odd.dcm", "ImageTooSmallError"),
        ("README.txt", "UnsupportedInputError"),
    ],
)
def test_known_bad_files_get_the_right_error(pydicom_file, name, error):
    with pytest.raises(InputError) as info:
        prepare_study(pydicom_file(name))
    assert type(info.value).__name__ == error


def test_native_fast_path_reads_what_pydicom_reads():
    """The direct read of uncompressed single frames equals pydicom's pixel_array on every corpus file."""
    import pydicom
    from pydicom.pixels import pixel_array

    from medlens.io.dicom_header import read_instance
    from medlens.io.dicom_pixels import read_native_frame

    checked = 0
    for param in CORPUS:
        path = param.values[0]
        try:
            inst = read_instance(path, str(path))
        except InputError:
            continue
        fast = read_native_frame(inst)
        if fast is None:
            continue
        full = pydicom.dcmread(path, force=True)
        full.file_meta.TransferSyntaxUID = inst.dataset.file_meta.TransferSyntaxUID
        reference = pixel_array(full)
        assert np.array_equal(fast, reference) and fast.dtype == reference.dtype, path.name
        checked += 1
    assert checked >= 5


def _compressed_decodable() -> list:
    import pydicom

    from medlens.io.dicom_pixels import UNCOMPRESSED

    out = []
    for param in CORPUS:
        path = param.values[0]
        try:
            meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
            syntax = str(meta.get("TransferSyntaxUID", ""))
        except Exception:
            continue
        if syntax and syntax not in UNCOMPRESSED and pydicom_decodes(path):
            out.append(path)
    return out


def test_pool_decodes_every_compressed_corpus_file_as_in_process():
    """Decoded frames from the worker pool equal in-process decoding on every compressed corpus file that pydicom
    decodes (the first 8 frames of each stack; typed refusals must be the same on both paths)."""
    from medlens.io import open_input, worker_pool

    files = _compressed_decodable()
    assert len(files) >= 20
    saved = worker_pool.settings()
    start = time.perf_counter()

    def frames(path: Path) -> object:
        try:
            stack = open_input(path)
            return stack.load(range(min(8, len(stack))))
        except InputError as exc:
            return type(exc)

    try:
        pooled = {path: frames(path) for path in files}
        worker_pool.configure(workers=0)
        for path in files:
            here = frames(path)
            if isinstance(here, np.ndarray):
                assert isinstance(pooled[path], np.ndarray), f"{path.name}: {pooled[path]}"
                np.testing.assert_array_equal(pooled[path], here, err_msg=path.name)
            else:
                assert pooled[path] is here, path.name
    finally:
        worker_pool.configure(saved.workers, saved.memory_mb)
    assert time.perf_counter() - start < 60
