"""``run_batch``: a manifest in, one envelope per row out, through :mod:`medlens.pipeline` (in this process,
or on a Ray cluster when ``ray`` is given). Every result is journaled (:mod:`medlens.journal`, in the output
folder) the moment it is made; rerunning the same command, even after ``kill -9``, reuses every journaled
row (greedy outputs: the same inputs, model and options give the same answer) and redoes only the rest,
failed rows included (a server that was away, a worker that was killed, get another chance)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from medlens import DISCLAIMER
from medlens.backends import Backend, BackendIdentity, check_backend_options, identify_backend, load_backend
from medlens.batch.keys import row_key
from medlens.batch.manifest import ManifestRow, checked_row, read_manifest
from medlens.batch.options import key_options, options_to_json, row_options
from medlens.batch.outputs import ERRORS, FORMATS, PARQUET, RESULTS, require_pyarrow, write_jsonl
from medlens.batch.stages import BatchStages
from medlens.errors import MedlensError
from medlens.interrupts import on_interrupt
from medlens.journal import JOURNAL, Journal
from medlens.pipeline import BackendSpec, Outcome, RaySettings, Unit, run_pipeline
from medlens.progress import Reporter
from medlens.tasks import TASKS, Task, TaskOptions, get_task
from medlens.tasks.runner import backend_identity
from medlens.warnings_capture import capture_warnings


def run_batch(
    manifest: str | Path,
    *,
    model: str,
    out_dir: str | Path,
    task: str | None = None,
    engine: str = "transformers",
    backend_options: dict[str, Any] | None = None,
    ray: RaySettings | None = None,
    batch_size: int = 8,
    fmt: str = "jsonl",
    options: TaskOptions | None = None,
    reporter: Reporter | None = None,
    stages_type: type[BatchStages] = BatchStages,
) -> dict[str, Any]:
    """Run every row of ``manifest`` (JSONL or CSV, :mod:`medlens.batch.manifest`) with ``model``; ``task``
    is the task of rows that name none and ``options`` the task options of every row (a row's own
    ``options`` on top). Writes results.jsonl, errors.jsonl (and results.parquet with ``fmt="parquet"``) and
    the journal to ``out_dir``; returns the summary: rows, ok, done (made by this run), reused (from the
    journal), failed, wall_s and the paths written. ``stages_type``: a subclass of
    :class:`~medlens.batch.stages.BatchStages` (tests wrap the preparation)."""
    start = time.perf_counter()
    FORMATS.get(fmt)
    if fmt == "parquet":
        require_pyarrow()
    if task is not None:
        TASKS.get(task)
    reporter = reporter or Reporter(False)
    base = options or TaskOptions()
    manifest = Path(manifest)
    rows = read_manifest(manifest)
    out = Path(out_dir)
    engine_options = dict(backend_options or {})
    check_backend_options(model, engine, **engine_options)
    identity, loaded = _identity(model, engine, engine_options, on_ray=ray is not None)
    spec = BackendSpec(model, engine, engine_options)
    without_model = _finishes_without_model(spec, ray)
    entries = _entries(rows, manifest.parent, task, base, identity.revision, without_model, reporter)
    stages = stages_type(
        identity=dataclasses.asdict(identity),
        remote=bool(getattr(loaded, "remote", False)),
        engine=engine,
        reasoner_options=engine_options,
    )
    backend: Backend | BackendSpec = loaded if loaded is not None and ray is None else spec
    failures: dict[str, dict[str, Any]] = {}
    with Journal(out) as journal, on_interrupt(lambda: _interrupted(out, journal, entries)):
        todo: dict[str, Unit] = {}
        for entry in entries:
            key = entry.get("key")
            if key is not None and "error" not in entry and key not in todo and journal.get(key) is None:
                todo[key] = Unit(key, entry["payload"])
        reused = sum(1 for e in entries if e.get("key") not in todo and "error" not in e)

        def record(outcome: Outcome) -> None:
            if outcome.ok:
                journal.add({"key": outcome.key, "row_id": outcome.row["row_id"], "envelope": outcome.result})
            else:
                failures[outcome.key] = dict(outcome.error or {})

        try:
            with capture_warnings() as caught:  # the engine's own (per row ones are in the envelopes)
                run_pipeline(
                    list(todo.values()),
                    stages,
                    backend,
                    on_outcome=record,
                    ray=ray,
                    batch_size=batch_size,
                    reporter=reporter,
                    title="batch",
                )
        finally:
            if loaded is not None:
                loaded.close()
        outcomes = [_outcome(entry, journal, failures) for entry in entries]
        run_warnings = [*journal.warnings, *caught]
    paths = write_jsonl(out, outcomes) + FORMATS.get(fmt)(out, outcomes)
    ok = sum(1 for o in outcomes if o.get("envelope") is not None)
    return {
        "rows": len(entries),
        "ok": ok,
        "done": sum(1 for o in outcomes if o.get("envelope") is not None and o["key"] in todo),
        "reused": reused,
        "failed": len(entries) - ok,
        "wall_s": round(time.perf_counter() - start, 3),
        "paths": {p.name: str(p) for p in [*paths, out / JOURNAL]},
        "model": identity.model_name,
        "engine": identity.engine,
        "runner": "ray" if ray is not None else "local",
        "warnings": run_warnings,
        "disclaimer": DISCLAIMER,
    }


def _identity(model: str, engine: str, options: dict[str, Any], on_ray: bool) -> tuple[BackendIdentity, Backend | None]:
    """The model's identity without loading it where the engine allows; else the loaded backend's (an HTTP
    client for a server, which also says whether requests leave the machine). On Ray, vLLM is never loaded on
    the driver (:func:`_unloaded_identity`)."""
    identity = identify_backend(model, engine, **options)
    if identity is None and on_ray:
        identity = _unloaded_identity(model, engine, options)
    if identity is not None:
        return identity, None
    backend = load_backend(model, engine, **options)
    return backend_identity(backend), backend


#: engines that load weights on GPUs: on Ray they are identified from their weights folder, never loaded here
_LOCAL_WEIGHTS_ON_RAY = ("vllm",)


def _unloaded_identity(model: str, engine: str, options: dict[str, Any]) -> BackendIdentity | None:
    """vLLM's identity as its backend computes it (the weights folder's fingerprint, the adapter's hash on it),
    without loading it on the driver; to move into :func:`medlens.backends.identify_backend` (requested)."""
    from medlens.backends import parse_model_spec
    from medlens.models import GENERATE, model_fingerprint, resolve_model
    from medlens.models.adapter import read_adapter

    engine, model, options = parse_model_spec(model, engine, options)
    if engine not in _LOCAL_WEIGHTS_ON_RAY:
        return None
    source = resolve_model(model, GENERATE)
    revision = model_fingerprint(source.path)
    adapter = None
    if options.get("adapter") is not None:
        info = read_adapter(options["adapter"])
        info.check_base(model, revision)
        revision, adapter = info.fingerprint(revision), info.identity()
    return BackendIdentity(
        engine=engine,
        model_name=model,
        revision=revision,
        default_max_new_tokens=source.default_max_new_tokens,
        is_test_model=source.is_test_model,
        model_warning=source.warning,
        adapter=adapter,
    )


def _entries(
    rows: list[ManifestRow],
    base_dir: Path,
    default_task: str | None,
    base: TaskOptions,
    revision: str,
    without_model: bool,
    reporter: Reporter,
) -> list[dict[str, Any]]:
    """Each row checked and keyed: ``{row_id, line, inputs, task, question, key, payload}``, or with an
    ``error`` (stage ``manifest`` or ``key``) for a row that fails before it is prepared."""
    seen: dict[str, int] = {}
    hashes: dict[str, str] = {}
    entries = []
    with reporter.stage("batch: reading the manifest and hashing inputs", total=len(rows)) as update:
        for number, row in enumerate(rows, start=1):
            entry: dict[str, Any] = {"row_id": row.row_id, "line": row.line, "inputs": [], "task": None}
            try:
                _fill(entry, row, base_dir, default_task, base, revision, without_model, seen, hashes)
            except MedlensError as exc:
                entry["error"] = {"error": type(exc).__name__, "reason": _one_line(exc.reason), "stage": entry["stage"]}
                if exc.path:
                    entry["error"]["path"] = str(exc.path)
            entry.pop("stage")
            entries.append(entry)
            update(number, len(rows))
    return entries


def _fill(
    entry: dict[str, Any],
    row: ManifestRow,
    base_dir: Path,
    default_task: str | None,
    base: TaskOptions,
    revision: str,
    without_model: bool,
    seen: dict[str, int],
    hashes: dict[str, str],
) -> None:
    """Check ``row`` into ``entry`` (``entry["stage"]`` says how far it got), then key it."""
    entry["stage"] = "manifest"
    checked = checked_row(row, base_dir, default_task, seen)
    entry |= {"inputs": checked.inputs, "task": checked.task, "question": checked.question}
    chosen = get_task(checked.task)
    opts = row_options(chosen, base, checked.options)
    _check_engine_path(chosen, without_model)
    entry["stage"] = "key"
    entry["key"] = row_key(checked.inputs, chosen.name, checked.question, key_options(chosen, opts), revision, hashes)
    entry["payload"] = {
        "row_id": row.row_id,
        "inputs": checked.inputs,
        "task": chosen.name,
        "question": checked.question,
        "options": options_to_json(opts),
    }


def _check_engine_path(task: Task, without_model: bool) -> None:
    """A two-stage task cannot run where rows are finished without a loaded model (Ray's vLLM processor)."""
    if without_model and type(task).second_stage is not Task.second_stage:
        raise MedlensError(
            f"task {task.name} asks the model a second time, which Ray's vLLM processor cannot (it finishes rows "
            "without a loaded model); run it with --engine transformers, --gpus-per-replica below 1, or without --ray"
        )


def _finishes_without_model(spec: BackendSpec, ray: RaySettings | None) -> bool:
    """Whether this run's Ray generation stage is the one registered as ``vllm`` (Ray Data LLM's processor),
    which hands ``finish`` no backend."""
    if ray is None:
        return False
    from medlens.pipeline.ray_runner import GENERATION, generation_stage

    stage = generation_stage(spec, ray)
    return GENERATION.get("vllm") == f"{stage.__module__}:{stage.__qualname__}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _outcome(entry: dict[str, Any], journal: Journal, failures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The row's result from the journal, or its error."""
    out = {k: v for k, v in entry.items() if k != "payload"}
    if "error" in entry:
        return out
    record = journal.get(entry["key"])
    if record is not None:
        out["envelope"] = record["envelope"]
    else:
        out["error"] = failures.get(entry["key"]) or {
            "error": "MedlensError",
            "reason": "no result was made for this row (the run stopped early); rerun to resume",
            "stage": "answer",
        }
    return out


def _interrupted(out: Path, journal: Journal, entries: list[dict[str, Any]]) -> str:
    keys = {e["key"] for e in entries if e.get("key") and "error" not in e}
    saved = sum(1 for key in keys if journal.get(key) is not None)
    return (
        f"interrupted: {saved} of {len(keys)} row results saved in {out / JOURNAL}; rerun the same command to "
        f"resume ({RESULTS}, {ERRORS} and {PARQUET} are written at the end)"
    )
