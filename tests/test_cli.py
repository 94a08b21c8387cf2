"""The command line end to end: prepare, ask with test-tiny, inspect, demo, exit codes, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from dicom_factory import write_not_dicom, write_series
from PIL import Image

from medlens import DISCLAIMER
from medlens.demo.phantom import ct_phantom, write_ct_series
from medlens.privacy import short_hash
from medlens.prompts import THINKING_INSTRUCTION

QUESTION = 'Is there "liver lesion" in the CT volume? Answer with "Final Answer: yes" or "Final Answer: no".'


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory):
    """A shuffled 100-slice synthetic CT series (more than 85 slices)."""
    folder = tmp_path_factory.mktemp("ct")
    hu, _ = ct_phantom(n_slices=100, size=64)
    write_ct_series(hu, folder, shuffle=True)
    return folder, hu


def test_prepare_writes_the_images_and_manifest(ct_study, tmp_path, cli):
    folder, hu = ct_study
    code, _out, err = cli("prepare", folder, "--out", tmp_path / "p", "--quiet")
    assert code == 0, err
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["recipe"] == "medgemma-1.5" and manifest["modality"] == "CT"
    assert manifest["disclaimer"] == DISCLAIMER
    images = manifest["images"]
    assert [i["file"] for i in images] == [f"{k:04d}.png" for k in range(1, 86)]
    assert all(i["frame"] is None and i["sop_instance_uid"] for i in images)
    zs = [i["z"] for i in images]
    assert zs == sorted(zs) and zs[0] == pytest.approx(0.0) and zs[-1] == pytest.approx(2.5 * 99)
    # PNG 0001 is the three HU windows of the most inferior phantom slice, unresized, exact
    first = np.asarray(Image.open(tmp_path / "p" / "0001.png"))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    from medlens.prep import ct_to_rgb

    assert np.array_equal(first, ct_to_rgb(hu[0].astype(np.float32)))
    last = np.asarray(Image.open(tmp_path / "p" / "0085.png"))
    assert np.array_equal(last, ct_to_rgb(hu[-1].astype(np.float32)))


def test_ask_with_test_tiny_prints_one_json_object(ct_study, cli):
    folder, _ = ct_study
    code, out, err = cli("ask", folder, QUESTION, "--model", "test-tiny", "-q")
    assert code == 0, err
    result = json.loads(out)
    for key in ("answer", "final_answer", "model", "recipe", "n_images", "timings", "disclaimer"):
        assert key in result
    assert result["model"] == "test-tiny" and result["untrained_test_model"] is True
    assert any("untrained test model" in w for w in result["warnings"])
    assert result["n_images"] == 85 and result["details"]["n_source_slices"] == 100
    assert result["task"] == "qa" and result["payload"]["answer"] == result["answer"]
    assert len(result["inputs"]) == 1 and len(result["inputs"][0]["sha256"]) == 64
    assert result["final_answer"] in (None, "yes", "no")
    assert set(result["timings"]) >= {"read_prepare", "load_model", "generate"}
    assert result["disclaimer"] == DISCLAIMER
    # 85 images x 4 image tokens of the tiny model are in the prompt
    assert result["prompt_tokens"] > 85 * 4
    assert "1.2." not in json.dumps(result)  # no raw UIDs in the printed result


@pytest.mark.parametrize("task", ["qa", "report"])
def test_ask_thinking_and_token_cap(ct_study, cli, tiny_backend, task):
    """``--think`` reaches the prompt: the same ask is longer by exactly the thinking instruction's tokens."""
    folder, _ = ct_study
    question = ["Describe."] if task == "qa" else []
    base = ["ask", folder, *question, "--task", task, "--max-new-tokens", "3", "-q"]
    code, out, err = cli(*base, "--think")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == task
    assert result["completion_tokens"] == 3  # test-tiny does not end within 3 tokens here
    code, out, err = cli(*base)
    assert code == 0, err
    plain = json.loads(out)
    assert plain["completion_tokens"] == 3 and plain["n_images"] == result["n_images"] == 85
    added = len(tiny_backend.tokenizer(f"{THINKING_INSTRUCTION}\n", add_special_tokens=False)["input_ids"])
    assert added == 26  # "SYSTEM INSTRUCTION: think silently if needed.\n" in test-tiny's small vocabulary
    assert result["prompt_tokens"] - plain["prompt_tokens"] == added


def test_series_option_and_inspect(tmp_path, cli):
    study = "1.2.826.0.1.3680043.8.498.50"
    a, b = "1.2.826.0.1.3680043.8.498.51", "1.2.826.0.1.3680043.8.498.52"
    frames = [np.full((32, 32), 1000, np.uint16)] * 6
    write_series(tmp_path / "s" / "a", frames, series_uid=a, study_uid=study, positions=[(0, 0, i) for i in range(6)])
    write_series(
        tmp_path / "s" / "b", frames[:3], series_uid=b, study_uid=study, positions=[(0, 0, i) for i in range(3)]
    )
    code, out, _ = cli("inspect", tmp_path / "s")
    assert code == 0 and short_hash(a) in out and short_hash(b) in out and a not in out
    code, _, err = cli("prepare", tmp_path / "s", "--out", tmp_path / "o")
    assert code == 0 and f"picked series {short_hash(a)}" in err
    code, _, _ = cli("prepare", tmp_path / "s", "--out", tmp_path / "o2", "--series", short_hash(b), "-q")
    assert code == 0 and len(json.loads((tmp_path / "o2" / "manifest.json").read_text())["images"]) == 3


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["prepare", "{missing}", "--out", "{out}"], "no such file or folder"),
        (["prepare", "{junk}", "--out", "{out}"], "not a DICOM file"),
        (["prepare", "{junk}", "--out", "{out}", "--recipe", "medgemma-15"], "did you mean 'medgemma-1.5'"),
        (["ask", "{junk}", "Q?"], "not a DICOM file"),
        (["ask", "{png}", "Q?", "--model", "no-such-model"], "no-such-model"),
        (["prepare", "--out", "{out}"], "Missing argument"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(tmp_path, cli, args, needle):
    junk = write_not_dicom(tmp_path / "junk.dcm")
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(png)
    values = {"missing": tmp_path / "nope", "out": tmp_path / "out", "junk": junk, "png": png}
    code, _out, err = cli(*[a.format(**values) for a in args])
    assert code == 2
    assert needle in err
    if "Missing" not in needle:
        assert err.startswith("medlens: error: ") and err.count("\n") == 1


def test_demo_writes_a_page(tmp_path, cli):
    code, _, err = cli("demo", "--out", tmp_path / "demo", "-q")
    assert code == 0, err
    page = (tmp_path / "demo" / "index.html").read_text()
    assert "montage.png" in page and "SLICE 1" in page and "untrained" in page and DISCLAIMER in page
    assert "medgemma-1.5-4b-it" in page  # how to use real weights
    assert (tmp_path / "demo" / "montage.png").stat().st_size > 1000
    assert len(list((tmp_path / "demo" / "study").glob("*.dcm"))) == 120
    assert len(list((tmp_path / "demo" / "prepared").glob("*.png"))) == 85


def test_import_and_prepare_do_not_import_torch(ct_study, tmp_path):
    folder, _ = ct_study
    code = (
        "import sys\n"
        "from medlens.cli import main\n"
        f"try:\n    main(['prepare', {str(folder)!r}, '--out', {str(tmp_path / 'o')!r}, '-q'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "medlens.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "prepare" in proc.stdout and "Research use only" in proc.stdout


def _has_overwrite() -> bool:
    import inspect

    from medlens.prep import write_prepared

    return "overwrite" in inspect.signature(write_prepared).parameters


@pytest.mark.skipif(not _has_overwrite(), reason="write_prepared(overwrite=) not there yet")
def test_prepare_refuses_an_earlier_output_without_overwrite(tmp_path, cli):
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(png)
    folder = tmp_path / "s"
    write_ct_series(ct_phantom(n_slices=4, size=32)[0], folder)
    assert cli("prepare", folder, "--out", tmp_path / "o", "-q")[0] == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 4
    code, _, err = cli("prepare", png, "--out", tmp_path / "o", "-q")
    assert code == 2 and "overwrite" in err
    assert cli("prepare", png, "--out", tmp_path / "o", "--overwrite", "-q")[0] == 0
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == ["0001.png"]  # no stale images
