"""``medlens eval``: run a benchmark on any backend, journaling every output, then score it.

Each item is keyed by its fields and its input files' content hashes (no preparation needed), the model
revision (with the hash of a PEFT adapter on the weights, when one is loaded), the benchmark's prompt
template hash, the generation parameters (token cap, temperature, thinking, seed) and the medlens version.
Greedy outputs already in the run's journal are reused, so rerunning the same command after a crash (even
``kill -9``) prepares and generates nothing that is done, and ends with the same results as an uninterrupted
run. Sampled outputs (temperature > 0) are never reused.

The run streams: only the items the journal lacks are prepared, one batch at a time (consecutive questions
about one study stay in one batch, sharing its preparation and prefix), and each batch's images are dropped
once its outputs are journaled, so memory stays that of a batch, not of the benchmark. What scoring needs
later (the prompt text, the parser's context such as a padded image size) is journaled with each output.

With ``ray`` (:class:`~medlens.pipeline.RaySettings`) the missing items go through :mod:`medlens.pipeline` on
a Ray cluster instead (:mod:`medlens.eval.pipelined`): the same keys, journal records and results. The local
path stays this module's own streaming loop: it journals each output the moment the engine hands it back
(mid-batch, through ``on_output``) and stops at an engine failure, which the pipeline, answering a batch of
studies at a time and finishing the other studies first, does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medlens import DISCLAIMER, __version__
from medlens.backends import (
    Backend,
    BackendIdentity,
    GenerationOutput,
    identify_backend,
    load_backend,
)
from medlens.backends.base import GenerationFailed
from medlens.errors import MedlensError
from medlens.eval.data import data_root, load_items
from medlens.eval.kinds import Item, Kind, Query
from medlens.eval.pipelined import generate_on_pipeline, study_units
from medlens.eval.registry import get_benchmark, make_kind
from medlens.eval.spec import BenchmarkSpec, Generation
from medlens.eval.stages import EvalStages, deidentify, journal_record, prompt_text, request_for, spec_digest
from medlens.files import sha256_of, write_json_atomic, write_jsonl_atomic
from medlens.interrupts import on_interrupt
from medlens.journal import JOURNAL, Journal
from medlens.models import BUILTIN_MODELS
from medlens.pipeline import BackendSpec, RaySettings
from medlens.prep.recipes import DEFAULT_RECIPE, RECIPES
from medlens.progress import Reporter
from medlens.warnings_capture import capture_warnings

SAMPLES = "samples.jsonl"
RESULTS = "results.json"
#: the scrubbing of queries for a remote backend, now in medlens.eval.stages (shared with the Ray path)
_deidentify = deidentify


def run_benchmark(
    benchmark: str,
    model: str | Backend,
    *,
    out_dir: str | Path,
    data: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    engine: str = "transformers",
    backend_options: dict[str, Any] | None = None,
    recipe: str = DEFAULT_RECIPE,
    n_resamples: int = 1000,
    judge: str | Backend | None = None,
    reporter: Reporter | None = None,
    ray: RaySettings | None = None,
) -> dict[str, Any]:
    """Run ``benchmark`` with ``model``; writes samples.jsonl, results.json and the journal to ``out_dir``.
    ``judge`` (any model) additionally grades free-text predictions for benchmarks that allow it; both load
    with ``engine`` and ``backend_options`` (device, dtype, engine arguments). With ``ray`` the missing items
    are prepared and generated on a Ray cluster (the model loads on its replicas); a failed item fails only
    itself, and once the others are journaled :class:`~medlens.eval.pipelined.ItemsFailedError` names it."""
    spec, spec_path = get_benchmark(benchmark)
    RECIPES.get(recipe)  # an unknown recipe fails before anything is read or loaded
    kind = make_kind(spec, spec_path, recipe)
    if judge is not None and not getattr(kind.options, "judge", False):
        raise MedlensError(f"benchmark {spec.name} has no free-text answers for a judge (only e.g. medpix-diagnosis)")
    reporter = reporter or Reporter(False)
    out = Path(out_dir)
    items = load_items(spec, data_root(data), limit)
    start = time.perf_counter()
    options = backend_options or {}
    backend: Backend | None = model if isinstance(model, Backend) else None
    identity = _identity(backend) if backend is not None else identify_backend(str(model), engine, **options)
    if identity is None:  # an engine that knows its revision only once loaded
        backend = load_backend(str(model), engine, **options)
        identity = _identity(backend)
    hashes: dict[Path, str] = {}
    with reporter.stage(f"{spec.name}: hashing inputs", total=len(items)) as update:
        files = []
        for number, item in enumerate(items, start=1):
            files.append(kind.files(item))
            for path in files[-1]:
                if path not in hashes:
                    hashes[path] = sha256_of(path)
            update(number, len(items))
    generation = spec.generation.resolved(identity.default_max_new_tokens)
    keys = _keys(spec, items, files, identity.revision, generation, hashes, recipe)
    state = _RunState(out / JOURNAL, keys)
    with Journal(out) as journal, on_interrupt(state.describe), capture_warnings() as caught:
        state.journal = journal
        todo = _missing(journal, keys, generation)
        if todo and ray is not None:  # the replicas load the model (and say which revision they loaded)
            remote = backend.remote if backend is not None else False  # engines known unloaded are local
            stages = EvalStages(benchmark, str(spec_path), spec_digest(spec), recipe, generation.model_dump(), remote)
            generate_on_pipeline(
                journal,
                stages,
                study_units(todo, items, files, keys),
                model if isinstance(model, Backend) else worker_spec(str(model), engine, options),
                revision=identity.revision,
                ray=ray,
                batch_size=batch_size,
                reporter=reporter,
                title=f"{spec.name} on Ray ({len(keys) - len(todo)} items reused), studies",
            )
        elif todo and backend is None:  # the model loads only when something is left to generate
            backend = load_backend(str(model), engine, **options)
            if _identity(backend) != identity:  # what loaded is not what was predicted: key by what loaded
                identity = _identity(backend)
                generation = spec.generation.resolved(identity.default_max_new_tokens)
                keys[:] = _keys(spec, items, files, identity.revision, generation, hashes, recipe)
                todo = _missing(journal, keys, generation)
        if todo and ray is None:
            assert backend is not None
            _generate_missing(journal, backend, kind, items, files, keys, todo, generation, batch_size, reporter)
        reused = len(keys) - len(todo)
        records = [journal.get(key) for key in keys]
        journal_warnings = list(journal.warnings)
    samples = [
        _sample(kind, item, paths, key, record or {}, hashes)
        for item, paths, key, record in zip(items, files, keys, records, strict=True)
    ]
    results = _results(spec, samples, identity, generation, n_resamples, reused, limit)
    results["warnings"] = journal_warnings + caught  # library warnings, short (medlens.warnings_capture)
    if judge is not None:  # the judge is its own model: the adapter is the graded model's
        judge_options = {key: value for key, value in options.items() if key != "adapter"}
        _add_judge(results, samples, judge, engine, judge_options, out, n_resamples)
    results["timings"] = {"total": round(time.perf_counter() - start, 3)}
    write_jsonl_atomic(out / SAMPLES, samples)
    write_json_atomic(out / RESULTS, results)
    return results


class _RunState:
    """What an interrupted run says it saved (see :func:`medlens.interrupts.on_interrupt`)."""

    def __init__(self, journal_path: Path, keys: list[str]) -> None:
        self.journal_path, self.keys = journal_path, keys
        self.journal: Journal | None = None

    def describe(self) -> str:
        saved = sum(1 for key in self.keys if self.journal is not None and self.journal.get(key))
        return (
            f"interrupted: {saved} of {len(self.keys)} outputs saved in {self.journal_path}; "
            "rerun the same command to resume"
        )


def _identity(backend: Backend) -> BackendIdentity:
    """A loaded backend's identity; its revision names the adapter too, so journal keys change with it."""
    return BackendIdentity(
        engine=backend.engine,
        model_name=backend.model_name,
        revision=backend.revision,
        default_max_new_tokens=backend.default_max_new_tokens,
        is_test_model=backend.is_test_model,
        model_warning=backend.model_warning,
        adapter=backend.adapter.identity() if backend.adapter is not None else None,
    )


def _missing(journal: Journal, keys: list[str], generation: Generation) -> list[int]:
    """The items to generate: those not journaled (all of them when sampling)."""
    greedy = generation.temperature == 0
    return [i for i, key in enumerate(keys) if not (greedy and journal.get(key))]


def worker_spec(model: str, engine: str, options: dict[str, Any]) -> BackendSpec:
    """How the replicas load the model: a model folder and an adapter folder given relative to this directory
    are made absolute (a worker's working directory is its own)."""
    if Path(model).exists():
        model = str(Path(model).absolute())
    if options.get("adapter") is not None:
        options = {**options, "adapter": str(Path(options["adapter"]).absolute())}
    return BackendSpec(model, engine, dict(options))


def _generate_missing(
    journal: Journal,
    backend: Backend,
    kind: Kind,
    items: list[Item],
    files: list[list[Path]],
    keys: list[str],
    todo: list[int],
    generation: Generation,
    batch_size: int,
    reporter: Reporter,
) -> None:
    """Prepare and generate the items of ``todo``, a batch at a time, journaling each output as soon as the
    backend hands it back (an interrupted batch keeps what it finished). A backend failure journals what the
    batch completed, then propagates."""
    streams = "on_output" in inspect.signature(backend.generate).parameters
    title = f"{kind.spec.name}: generating ({len(keys) - len(todo)} reused)"
    with reporter.stage(title, total=len(todo)) as update:
        done = 0
        for batch in study_batches(todo, files, batch_size):
            queries = [kind.query(items[i]) for i in batch]
            if backend.remote:  # text leaving the machine is de-identified (docs/hospital.md)
                deidentify(queries)
            requests = [request_for(query, generation) for query in queries]
            journaled: set[int] = set()

            def save(position: int, output: GenerationOutput, batch=batch, queries=queries, seen=journaled) -> None:
                if position not in seen:
                    _journal(journal, batch, items, keys, queries, {position: output})
                    seen.add(position)

            try:
                if streams:
                    outputs = dict(enumerate(backend.generate(requests, on_output=save)))
                else:
                    outputs = dict(enumerate(backend.generate(requests)))
            except GenerationFailed as failed:
                for position, output in sorted(failed.outputs.items()):
                    save(position, output)
                _name_item(failed, items[batch[failed.index]])
                raise
            for position, output in sorted(outputs.items()):
                save(position, output)
            done += len(batch)
            update(done, len(todo))


def _name_item(failed: GenerationFailed, item: Item) -> None:
    """Say which benchmark item failed (the engine knows only its place in the batch); the type stays."""
    done = len(failed.outputs)
    failed.reason = (
        f"item {item.get('id')}: {failed.error.reason} ({done} outputs of the batch journaled; rerun to resume)"
    )
    failed.args = (f"{failed.path}: {failed.reason}" if failed.path else failed.reason,)


def study_batches(todo: list[int], files: list[list[Path]], batch_size: int) -> Iterator[list[int]]:
    """``todo`` in batches of ``batch_size``, a batch extended while the next item asks about the same inputs
    (so all questions about one study share its preparation and, in the engine, its prefix)."""
    batch: list[int] = []
    for i in todo:
        if len(batch) >= batch_size and files[i] != files[batch[-1]]:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _journal(
    journal: Journal,
    batch: list[int],
    items: list[Item],
    keys: list[str],
    queries: list[Query],
    outputs: dict[int, GenerationOutput],
) -> None:
    """Journal each output with what scoring needs later (:func:`~medlens.eval.stages.journal_record`)."""
    for position, output in sorted(outputs.items()):
        i = batch[position]
        journal.add(journal_record(keys[i], items[i], queries[position], output))


def _keys(
    spec: BenchmarkSpec,
    items: list[Item],
    files: list[list[Path]],
    revision: str,
    generation: Generation,
    hashes: dict[Path, str],
    recipe: str,
) -> list[str]:
    return [
        _key(spec, item, paths, revision, generation, hashes, recipe) for item, paths in zip(items, files, strict=True)
    ]


def _key(
    spec: BenchmarkSpec,
    item: Item,
    files: list[Path],
    revision: str,
    generation: Generation,
    hashes: dict[Path, str],
    recipe: str,
) -> str:
    for path in files:
        if path not in hashes:
            hashes[path] = sha256_of(path)
    content = {
        "item": {k: v for k, v in item.items() if not k.startswith("_")},
        "inputs": [hashes[p] for p in files],
        "model": revision,
        "template": spec.template_hash,
        "recipe": recipe,
        "generation": generation.model_dump(),
        "medlens": __version__,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _sample(
    kind: Kind, item: Item, files: list[Path], key: str, record: dict[str, Any], hashes: dict[Path, str]
) -> dict[str, Any]:
    """One scored item from its journal record (a record without a context was journaled by an older
    medlens: its query is rebuilt)."""
    raw = record.get("raw_output", "")
    if "context" in record:
        prompt, context = record.get("prompt", ""), record["context"]
    else:
        query = kind.query(item)
        prompt, context = prompt_text(query), query.context
    return {
        "id": item["id"],
        "inputs": {str(p): hashes[p] for p in files},
        "prompt": prompt,
        "raw_output": raw,
        "prediction": kind.predict(raw, item, context),
        "target": kind.target(item),
        "group": kind.group(item),
        "scores": {},
        "key": key,
    }


def _results(
    spec: BenchmarkSpec,
    samples: list[dict[str, Any]],
    backend: BackendIdentity,
    generation: Generation,
    n_resamples: int,
    reused: int,
    limit: int | None,
) -> dict[str, Any]:
    from medlens.metrics.functions import METRICS, item_scores
    from medlens.metrics.stats import bootstrap_ci

    predictions = [s["prediction"] for s in samples]
    targets = [s["target"] for s in samples]
    groups = [s["group"] for s in samples] if any(s["group"] is not None for s in samples) else None
    metrics = {}
    for metric in spec.metrics:
        fn = METRICS.get(metric.fn)
        interval = bootstrap_ci(fn, predictions, targets, groups, n_resamples=n_resamples, **metric.options)
        metrics[metric.name] = {
            "value": interval.value,
            "ci_low": interval.low,
            "ci_high": interval.high,
            "n": interval.n,
            "confidence": 0.95,
        }
        per_item = item_scores(metric.fn, predictions, targets, groups, **metric.options)
        for sample, score in zip(samples, per_item or [], strict=False):
            sample["scores"][metric.name] = score
    return {
        "benchmark": spec.name,
        "description": spec.description,
        "model": backend.model_name,
        "engine": backend.engine,
        "model_revision": backend.revision,
        "adapter": backend.adapter,
        "untrained_test_model": backend.is_test_model,
        "test_model": backend.is_test_model or backend.model_name in BUILTIN_MODELS,
        "model_warning": backend.model_warning,
        "n_items": len(samples),
        "n_reused": reused,
        "n_unparsed": sum(1 for p in predictions if p is None),
        "limit": limit,
        "metrics": metrics,
        "metric_specs": [m.model_dump() for m in spec.metrics],
        "published": spec.published.model_dump(),
        "config": {"generation": generation.model_dump(), "template_hash": spec.template_hash, "kind": spec.kind},
        "versions": _versions(),
        "disclaimer": DISCLAIMER,
    }


def _add_judge(
    results: dict[str, Any],
    samples: list[dict[str, Any]],
    judge: str | Backend,
    engine: str,
    backend_options: dict[str, Any],
    out: Path,
    n: int,
) -> None:
    """Grade every prediction with the judge model; adds the ``judge_match`` metric and per-item verdicts."""
    from medlens.eval.judge import judge_verdicts
    from medlens.metrics.functions import accuracy
    from medlens.metrics.stats import bootstrap_ci

    judge_backend = judge if isinstance(judge, Backend) else load_backend(judge, engine, **backend_options)
    with Journal(out) as journal:
        verdicts = judge_verdicts(samples, judge_backend, judge_backend.revision, journal)
    interval = bootstrap_ci(accuracy, verdicts, ["yes"] * len(verdicts), n_resamples=n)
    results["metrics"]["judge_match"] = {
        "value": _finite(interval.value),
        "ci_low": _finite(interval.low),
        "ci_high": _finite(interval.high),
        "n": interval.n,
        "confidence": 0.95,
        "judge": judge_backend.model_name,
    }
    for sample, verdict in zip(samples, verdicts, strict=True):
        sample["scores"]["judge_match"] = 1.0 if verdict == "yes" else 0.0


def _finite(value: float) -> float | None:
    """Metrics undefined on these items (NaN) are written as null: results.json stays strict JSON."""
    return None if value is None or value != value else float(value)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"medlens": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "pydicom", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[package] = version(package)
    return out
