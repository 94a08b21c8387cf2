"""Library warnings never reach the terminal raw: they become short, deduplicated envelope warnings."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from medlens.warnings_capture import MAX_CHARS, SILENCED, capture_warnings


def _dicom_with_long_series_description(path: Path) -> Path:
    """A radiograph whose SeriesDescription (LO, at most 64 characters) is 80 long: pydicom warns on reading."""
    from dicom_factory import write_radiograph
    from pydicom import config

    before = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        pixels = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom also warns when the value is set
            return write_radiograph(path, pixels, extra={"SeriesDescription": "x" * 80})
    finally:
        config.settings.writing_validation_mode = before


def test_cli_turns_a_pydicom_warning_into_an_envelope_warning(tmp_path: Path) -> None:
    path = _dicom_with_long_series_description(tmp_path / "long_description.dcm")
    code = "import sys; from medlens.cli import main; main(sys.argv[1:])"
    proc = subprocess.run(
        [sys.executable, "-c", code, "ask", str(path), "-Q", "what is shown?", "--model", "test-tiny", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "UserWarning" not in proc.stderr and "exceeds the maximum length" not in proc.stderr
    envelope = json.loads(proc.stdout)
    pydicom_warnings = [w for w in envelope["warnings"] if w.startswith("pydicom:")]
    assert len(pydicom_warnings) == 1  # warned and logged by pydicom, reported once
    assert "exceeds the maximum length of 64 allowed for VR LO" in pydicom_warnings[0]


def test_warnings_and_library_logs_are_collected_short_and_once(capsys: pytest.CaptureFixture[str]) -> None:
    with capture_warnings() as caught:
        for _ in range(3):
            warnings.warn("a library says something " + "long " * 100, UserWarning, stacklevel=1)
        logging.getLogger("pydicom.valuerep").warning("bad value in %s", "PatientAge")
        logging.getLogger("transformers.generation").warning("Setting `pad_token_id` to `eos_token_id`:1")
        assert caught == []  # filled on exit
    assert len(caught) == 2
    assert caught[0].startswith("a library says something") and len(caught[0]) == MAX_CHARS
    assert caught[1] == "pydicom: bad value in PatientAge"
    err = capsys.readouterr().err
    assert "UserWarning" not in err and "PatientAge" not in err and "pad_token_id" not in err
    assert SILENCED  # the silenced noise is listed with its reason


def test_capture_restores_the_logging_and_warning_state_and_nests() -> None:
    logger = logging.getLogger("pydicom")
    handlers, propagate, show = list(logger.handlers), logger.propagate, warnings.showwarning
    with capture_warnings() as outer:
        with capture_warnings() as inner:
            warnings.warn("seen by both", UserWarning, stacklevel=1)
        warnings.warn("seen by the outer one", UserWarning, stacklevel=1)
    assert inner == ["seen by both"] and outer == ["seen by both", "seen by the outer one"]
    assert logger.handlers == handlers and logger.propagate == propagate and warnings.showwarning is show


def test_a_handler_a_library_adds_meanwhile_is_muted_then_kept() -> None:
    import io

    logger = logging.getLogger("transformers")
    stream = io.StringIO()
    added = logging.StreamHandler(stream)  # what transformers does when it is first imported inside the run
    try:
        with capture_warnings() as caught:
            logger.addHandler(added)
            logging.getLogger("transformers.generation.utils").warning("The attention was odd")
        assert caught == ["transformers: The attention was odd"]
        assert stream.getvalue() == "" and added in logger.handlers
    finally:
        logger.removeHandler(added)


def test_c_level_stderr_becomes_warnings_while_a_capture_is_open(capfd: pytest.CaptureFixture[str]) -> None:
    from medlens.warnings_capture import native_stderr

    with capture_warnings() as caught, native_stderr("openjpeg"):
        os.write(2, b"Invalid number of tiles\nMarker handler function failed\n")
        os.write(2, b"\x1b[2Kprogress 3/85\n")  # another thread's progress bar: written back, not recorded
    assert caught == ["openjpeg: Invalid number of tiles", "openjpeg: Marker handler function failed"]
    assert capfd.readouterr().err == "\x1b[2Kprogress 3/85\n"
    with native_stderr("openjpeg"):  # no capture open: descriptor 2 is left alone
        os.write(2, b"raw\n")
    assert capfd.readouterr().err == "raw\n"


def test_openjpeg_messages_do_not_reach_the_terminal() -> None:
    """pydicom's corpus file whose JPEG 2000 header makes openjpeg print two lines on descriptor 2 from C."""
    pytest.importorskip("pydicom.data")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("JPEG2000-embedded-sequence-delimiter.dcm")
    code = "import sys; from medlens.cli import main; main(sys.argv[1:])"
    proc = subprocess.run(
        [sys.executable, "-c", code, "prepare", str(path), "--out", "/dev/null/never"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medlens: error:"), proc.stderr
    assert "Invalid number of tiles" not in proc.stderr
