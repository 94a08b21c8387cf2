"""``medlens batch`` locally: twelve synthetic studies (one corrupt, one whose decoder hangs) -> ten envelopes
equal to ``run_task``'s and two typed errors; the journal makes a rerun (also after ``kill -9`` of the driver)
redo only the missing rows; Parquet reads back with the documented schema; bad rows fail only themselves and an
unreadable manifest exits 2 naming the file and the line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_data import (
    FAILING,
    HANG_LIMIT_S,
    FaultyDecoderStages,
    read_jsonl,
    without_timings,
    write_manifest,
)

from medlens import DISCLAIMER
from medlens.batch import run_batch
from medlens.batch.keys import row_key
from medlens.batch.manifest import ManifestError, ManifestRow, RowProblem, checked_row, read_manifest
from medlens.batch.options import key_options, row_options
from medlens.batch.outputs import PARQUET_COLUMNS, parquet_schema
from medlens.tasks import TaskOptions, get_task

TESTS = Path(__file__).resolve().parent
OK_IDS = ["ct-q1", "ct-q2", "ct-rle", "dx", "cr-report", "dx-localize", "compare", "png", "slide", "labs"]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The manifest run once, uninterrupted, with Parquet output."""
    root = tmp_path_factory.mktemp("batch")
    manifest = write_manifest(root)
    start = time.monotonic()
    summary = run_batch(
        manifest, model="test-tiny", task="qa", out_dir=root / "out", fmt="parquet", stages_type=FaultyDecoderStages
    )
    summary["elapsed"] = time.monotonic() - start
    return root, manifest, summary


def _results(out: Path) -> dict[str, dict]:
    return {r["row_id"]: r for r in read_jsonl(out / "results.jsonl")}


def test_ten_results_and_two_typed_errors(local_run):
    root, _, summary = local_run
    assert {k: summary[k] for k in ("rows", "ok", "done", "reused", "failed")} == {
        "rows": 12,
        "ok": 10,
        "done": 10,
        "reused": 0,
        "failed": 2,
    }
    results = read_jsonl(root / "out" / "results.jsonl")
    assert [r["row_id"] for r in results] == OK_IDS, "manifest order"
    for r in results:
        assert r["disclaimer"] == DISCLAIMER and len(r["key"]) == 64 and r["untrained_test_model"]
    assert len({r["key"] for r in results}) == 10, "two questions about one study are two rows"
    by_id = {r["row_id"]: r for r in results}
    assert by_id["ct-q1"]["n_images"] == 5 and by_id["ct-q1"]["details"]["modality"] == "CT"
    assert by_id["compare"]["task"] == "compare" and len(by_id["compare"]["inputs"]) == 2
    assert by_id["labs"]["task"] == "lab-extract" and by_id["slide"]["details"]["family"] == "wsi"
    errors = {e["row_id"]: e for e in read_jsonl(root / "out" / "errors.jsonl")}
    assert sorted(errors) == sorted(FAILING)
    for row_id, (kind, needle) in FAILING.items():
        error = errors[row_id]
        assert error["error"] == kind and needle in error["reason"] and error["stage"] == "prepare"
        assert error["input"].endswith(row_id.replace("corrupt", "corrupt.dcm")) and error["disclaimer"] == DISCLAIMER
    assert "hang-0001.dcm" in errors["ct-hang"]["path"], "the error names the file"
    assert f"timed out after {HANG_LIMIT_S:g} s" in errors["ct-hang"]["reason"], "the hang is bounded"


def test_envelopes_equal_run_task(local_run, tiny_backend):
    """finish is parse + envelope exactly as run_task makes them (batched generation changes nothing)."""
    from medlens.tasks.runner import run_task

    root, _, _ = local_run
    results = _results(root / "out")
    studies = root / "studies"
    cases = {
        "ct-q1": ("qa", [studies / "ct"], "Is there a lung nodule?", {}),
        "compare": ("compare", [studies / "dx.dcm", studies / "cr.dcm"], None, {"allow_different_patients": True}),
    }
    for row_id, (name, inputs, question, given) in cases.items():
        task = get_task(name)
        envelope = run_task(task, inputs, question, tiny_backend, row_options(task, TaskOptions(), given))
        expected = without_timings(envelope.model_dump(mode="json"))
        got = {k: v for k, v in results[row_id].items() if k not in ("row_id", "key")}
        assert without_timings(got) == expected, row_id


def test_parquet_reads_back_with_the_documented_schema(local_run):
    import pyarrow.parquet as pq

    root, _, _ = local_run
    table = pq.read_table(root / "out" / "results.parquet")
    assert table.schema.equals(parquet_schema()) and table.column_names == list(PARQUET_COLUMNS)
    rows = table.to_pylist()
    assert len(rows) == 12 and sum(r["ok"] for r in rows) == 10
    results = _results(root / "out")
    for row in rows:
        if row["ok"]:
            envelope = json.loads(row["envelope_json"])
            assert {"row_id": row["row_id"], "key": row["key"], **envelope} == results[row["row_id"]]
            assert row["final_answer"] == envelope["final_answer"] and row["inputs"] == [
                i["file"] for i in envelope["inputs"]
            ]
        else:
            assert row["error"] == FAILING[row["row_id"]][0] and row["envelope_json"] is None
        assert row["disclaimer"] == DISCLAIMER


def test_a_rerun_reuses_every_journaled_row_without_loading_the_model(local_run, monkeypatch):
    from medlens.pipeline.spec import BackendSpec

    root, manifest, _ = local_run
    before = _results(root / "out")

    def no_load(self):
        raise AssertionError("the model was loaded although every result is journaled")

    monkeypatch.setattr(BackendSpec, "load", no_load)
    summary = run_batch(manifest, model="test-tiny", task="qa", out_dir=root / "out", stages_type=FaultyDecoderStages)
    assert (summary["done"], summary["reused"], summary["failed"]) == (0, 10, 2), "failed rows get another chance"
    assert _results(root / "out") == before
    assert len(read_jsonl(root / "out" / "journal.jsonl")) == 10, "nothing journaled twice"


def test_the_driver_killed_mid_run_then_rerun_redoes_only_missing_rows(local_run, tmp_path):
    root, manifest, _ = local_run
    out = tmp_path / "out"
    script = (
        "import batch_data, sys; batch_data.install_faulty_decoder(); from medlens.cli import main; main(sys.argv[1:])"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "MEDLENS_TASK_TIMEOUT_S": str(HANG_LIMIT_S),
    }
    args = ["batch", str(manifest), "--task", "qa", "--out", str(out), "--batch-size", "2", "-q"]
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=env, stderr=subprocess.PIPE)
    journal = out / "journal.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    saved = len({r["key"] for r in read_jsonl(journal)})
    assert not (out / "results.jsonl").exists(), "outputs are written at the end"
    summary = run_batch(
        manifest, model="test-tiny", task="qa", out_dir=out, batch_size=2, stages_type=FaultyDecoderStages
    )
    assert 0 < saved < 10 and summary["reused"] == saved and summary["done"] == 10 - saved
    keys = [r["key"] for r in read_jsonl(journal)]
    assert len(keys) == len(set(keys)) == 10, "no row journaled twice"
    expected = {k: without_timings(v) for k, v in _results(root / "out").items()}
    assert {k: without_timings(v) for k, v in _results(out).items()} == expected


def test_bad_rows_fail_only_themselves(tmp_path):
    import numpy as np
    from dicom_factory import write_radiograph

    write_radiograph(tmp_path / "x.dcm", np.arange(48 * 40, dtype=np.uint16).reshape(48, 40))
    rows = [
        {"id": "good", "input": "x.dcm", "question": "Is there a pneumothorax?", "task": "qa"},
        {"id": "no-task", "input": "x.dcm", "question": "?"},
        {"id": "unknown-option", "input": "x.dcm", "task": "qa", "question": "?", "options": {"dpi": 100}},
        {"id": "bad-type", "input": "x.dcm", "task": "qa", "question": "?", "options": {"thinking": "yes"}},
        {"id": "missing", "input": "nowhere.dcm", "task": "qa", "question": "?"},
        {"id": "both", "input": "x.dcm", "inputs": ["x.dcm"], "task": "qa", "question": "?"},
        {"id": "unknown-task", "input": "x.dcm", "task": "qaa", "question": "?"},
        {"id": "good", "input": "x.dcm", "task": "qa", "question": "again?"},
        {"id": "one-input", "input": "x.dcm", "task": "compare"},
        {"id": "overlay", "input": "x.dcm", "task": "localize", "options": {"overlay": "o.png"}},
    ]
    manifest = write_manifest(tmp_path, rows)
    summary = run_batch(manifest, model="test-tiny", out_dir=tmp_path / "out")
    assert (summary["ok"], summary["failed"]) == (1, 9)
    errors = {e["line"]: e for e in read_jsonl(tmp_path / "out" / "errors.jsonl")}
    expected = {
        2: ("RowProblem", "no task", "manifest"),
        3: ("RowProblem", "unknown option 'dpi' for task qa", "manifest"),
        4: ("RowProblem", "option 'thinking' must be bool", "manifest"),
        5: ("NotFoundError", "no such file or folder", "key"),
        6: ("RowProblem", "exactly one of 'input'", "manifest"),
        7: ("UnknownNameError", "did you mean 'qa'", "manifest"),
        8: ("RowProblem", "id 'good' is already used on line 1", "manifest"),
        9: ("MedlensError", "task compare takes 2 input(s), got 1", "prepare"),
        10: ("RowProblem", "option 'overlay' is not available in batch", "manifest"),
    }
    assert sorted(errors) == sorted(expected)
    for line, (kind, needle, stage) in expected.items():
        assert (errors[line]["error"], errors[line]["stage"]) == (kind, stage) and needle in errors[line]["reason"]
    assert errors[5]["path"].endswith("nowhere.dcm")


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("m.jsonl", '{"input": "a.dcm"}\nnot json\n', "line 2: not JSON"),
        ("m.jsonl", '{"input": "a.dcm"}\n[1, 2]\n', "line 2: a row must be a JSON object"),
        ("m.txt", "a.dcm\n", "unknown manifest format '.txt'"),
        ("m.csv", "input,colour\na.dcm,red\n", "line 1: unknown column(s) 'colour'"),
        ("m.csv", "input,task\na.dcm,qa,extra\n", "line 2: more cells than columns"),
        ("m.jsonl", "\n\n", "the manifest has no rows"),
        ("m.jsonl", b"\xff\xfe{", "not UTF-8"),
    ],
)
def test_an_unreadable_manifest_exits_2_naming_file_and_line(tmp_path, cli, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, out, err = cli("batch", path, "--task", "qa", "--out", tmp_path / "out")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and str(path) in err and needle in err, err
    with pytest.raises(ManifestError):
        read_manifest(path)


def test_csv_rows_take_several_inputs_and_json_options(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        'id,inputs,task,options\nc1,prior.dcm;current.dcm,compare,"{""allow_different_patients"": true}"\n,x.png,qa,\n',
        encoding="utf-8",
    )
    first, second = read_manifest(path)
    row = checked_row(first, tmp_path, None, {})
    assert row.inputs == [str(tmp_path / "prior.dcm"), str(tmp_path / "current.dcm")] and row.task == "compare"
    assert row.options == {"allow_different_patients": True} and row.row_id == "c1"
    assert second.row_id == "2", "ids default to the row number"
    with pytest.raises(RowProblem, match="no task"):
        checked_row(ManifestRow("3", 3, {"input": "x.png"}), tmp_path, None, {})


def test_row_options_check_names_types_and_bounds():
    lab, qa = get_task("lab-extract"), get_task("qa")
    assert row_options(lab, TaskOptions(), {"dpi": 72}).dpi == 72
    slide = row_options(qa, TaskOptions(), {"slide": {"max_patches": 4}}).slide
    assert slide.max_patches == 4
    assert row_options(qa, TaskOptions(), {"allow_burned_in": True}).extra == {"allow_burned_in": True}
    for given, needle in [
        ({"dpi": 10}, "within 50..600"),
        ({"dpi": True}, "must be int"),
        ({"colour": 1}, "unknown option 'colour'"),
        ({"slide": {"zoom": 2}}, "unknown slide setting(s) 'zoom'"),
    ]:
        with pytest.raises(RowProblem, match=needle.replace("(", r"\(").replace(")", r"\)")):
            row_options(lab, TaskOptions(), given)


def test_row_keys_follow_content_and_settings_not_ids(tmp_path, monkeypatch):
    study = tmp_path / "s.png"
    study.write_bytes(b"one")
    qa = get_task("qa")
    opts = key_options(qa, TaskOptions())

    def key(question="q?", options=opts, revision="rev1"):
        return row_key([str(study)], "qa", question, options, revision, {})

    first = key()
    assert key() == first
    assert len({first, key("other?"), key(revision="rev2"), key(options={**opts, "thinking": True})}) == 4
    assert key_options(qa, TaskOptions(slide=TaskOptions().slide.__class__(workers=3))) == opts, "workers: how"
    study.write_bytes(b"two")
    assert key() != first, "the content changed"

    from medlens.batch import keys
    from medlens.io import dicomweb
    from medlens.io.dicomweb import RemoteSeries

    listed = [RemoteSeries("1.2.3", "CT", 40, "", 1)]
    monkeypatch.setattr(dicomweb, "connect", lambda server: None)
    monkeypatch.setattr("medlens.io.dicomweb_config.get_server", lambda name: name)
    monkeypatch.setattr(dicomweb, "search_series", lambda client, server, ref: listed)
    ref = "dicomweb://pacs/1.2.840.1"
    before = keys.dicomweb_identity(ref)
    listed[0] = RemoteSeries("1.2.3", "CT", 41, "", 1)
    assert keys.dicomweb_identity(ref) != before, "an instance added to the series changes the key"


def test_cli_prints_the_summary_and_refuses_ray_flags_without_ray(tmp_path, cli):
    import numpy as np
    from dicom_factory import write_radiograph

    write_radiograph(tmp_path / "x.dcm", np.arange(48 * 40, dtype=np.uint16).reshape(48, 40))
    manifest = write_manifest(tmp_path, [{"input": "x.dcm", "question": "Is there a pneumothorax?"}])
    code, out, err = cli("batch", manifest, "--task", "qa", "--out", tmp_path / "out", "-q")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("batch: 1 rows: 1 results (1 made, 0 reused from the journal), 0 failed")
    assert f"wrote {tmp_path / 'out' / 'results.jsonl'}" in lines and lines[-1] == DISCLAIMER
    code, out, err = cli("batch", manifest, "--task", "qa", "--out", tmp_path / "out", "--json", "-q")
    assert code == 0 and json.loads(out)["reused"] == 1
    code, _, err = cli("batch", manifest, "--out", tmp_path / "out", "--replicas", "2")
    assert code == 2 and "--replicas, --gpus-per-replica and --cpus-per-prepare go with --ray" in err
    code, _, err = cli("batch", manifest, "--out", tmp_path / "out", "--task", "qa", "--dpi", "100")
    assert code == 2 and "--dpi is an option of lab-extract" in err


def test_two_stage_tasks_are_refused_up_front_on_rays_vllm_processor(tmp_path):
    """Ray's vLLM processor finishes rows without a loaded model: a differential row fails before any work."""
    from medlens.pipeline import RaySettings

    (tmp_path / "x.png").write_bytes(b"not read")
    manifest = write_manifest(tmp_path, [{"id": "d", "input": "x.png", "task": "differential"}])
    settings = RaySettings(gpus_per_replica=1)
    summary = run_batch(manifest, model="test-tiny", engine="vllm", out_dir=tmp_path / "out", ray=settings)
    (error,) = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert (summary["failed"], error["stage"]) == (1, "manifest")
    assert "asks the model a second time, which Ray's vLLM processor cannot" in error["reason"]


def test_docs_list_the_parquet_schema():
    text = (TESTS.parent / "docs" / "batch.md").read_text(encoding="utf-8")
    for name, (kind, meaning) in PARQUET_COLUMNS.items():
        assert f"| `{name}` | {kind} | {meaning} |" in text, name
