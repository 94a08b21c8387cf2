"""``medlens eval``: run a benchmark on any backend, journaling every output, then score it.

Each item's request is keyed by the content of its inputs, the model revision, the benchmark's prompt
template hash, the generation parameters (token cap, temperature, thinking, seed) and the medlens version.
Greedy outputs already in the run's journal are reused, so rerunning the same command after a crash (even
``kill -9``) redoes nothing and ends with the same results as an uninterrupted run. Sampled outputs
(temperature > 0) are never reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

from medlens import DISCLAIMER, __version__
from medlens.backends import Backend, GenerationRequest, load_backend
from medlens.errors import MedlensError
from medlens.eval.data import data_root, load_items
from medlens.eval.journal import Journal
from medlens.eval.kinds import Item, Kind, Query
from medlens.eval.registry import get_benchmark, make_kind
from medlens.eval.spec import BenchmarkSpec, Generation
from medlens.files import sha256_of, write_json_atomic, write_jsonl_atomic
from medlens.prep.recipes import DEFAULT_RECIPE
from medlens.progress import Reporter

SAMPLES = "samples.jsonl"
RESULTS = "results.json"


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
) -> dict[str, Any]:
    """Run ``benchmark`` with ``model``; writes samples.jsonl, results.json and the journal to ``out_dir``.
    ``judge`` (any model) additionally grades free-text predictions for benchmarks that allow it; both load
    with ``engine`` and ``backend_options`` (device, dtype, engine arguments)."""
    spec, spec_path = get_benchmark(benchmark)
    kind = make_kind(spec, spec_path, recipe)
    if judge is not None and not getattr(kind.options, "judge", False):
        raise MedlensError(f"benchmark {spec.name} has no free-text answers for a judge (only e.g. medpix-diagnosis)")
    reporter = reporter or Reporter(False)
    out = Path(out_dir)
    items = load_items(spec, data_root(data), limit)
    start = time.perf_counter()
    backend = model if isinstance(model, Backend) else load_backend(model, engine, **(backend_options or {}))
    generation = spec.generation.resolved(backend.default_max_new_tokens)
    revision = backend.revision
    hashes: dict[Path, str] = {}
    with reporter.stage(f"{spec.name}: preparing", total=len(items)) as update:
        queries, keys = [], []
        for number, item in enumerate(items, start=1):
            query = kind.query(item)
            queries.append(query)
            keys.append(_key(spec, item, query, revision, generation, hashes))
            update(number, len(items))
    with Journal(out) as journal:
        reused = _generate_missing(journal, backend, spec, items, queries, keys, generation, batch_size, reporter)
        records = [journal.get(key) for key in keys]
    samples = [
        _sample(kind, item, query, key, record, hashes)
        for item, query, key, record in zip(items, queries, keys, records, strict=True)
    ]
    results = _results(spec, samples, backend, revision, generation, n_resamples, reused, limit)
    if judge is not None:
        _add_judge(results, samples, judge, engine, backend_options or {}, out, n_resamples)
    results["timings"] = {"total": round(time.perf_counter() - start, 3)}
    write_jsonl_atomic(out / SAMPLES, samples)
    write_json_atomic(out / RESULTS, results)
    return results


def _generate_missing(
    journal: Journal,
    backend: Backend,
    spec: BenchmarkSpec,
    items: list[Item],
    queries: list[Query],
    keys: list[str],
    generation: Generation,
    batch_size: int,
    reporter: Reporter,
) -> int:
    """Generate the items not journaled yet (all of them when sampling), in batches; returns how many were reused."""
    greedy = generation.temperature == 0
    todo = [i for i, key in enumerate(keys) if not (greedy and journal.get(key))]
    with reporter.stage(f"{spec.name}: generating ({len(keys) - len(todo)} reused)", total=len(todo)) as update:
        for done in range(0, len(todo), batch_size):
            batch = todo[done : done + batch_size]
            requests = [
                GenerationRequest(
                    queries[i].messages,
                    max_new_tokens=generation.max_new_tokens,
                    temperature=generation.temperature,
                    seed=generation.seed,
                )
                for i in batch
            ]
            for i, output in zip(batch, backend.generate(requests), strict=True):
                journal.add(
                    {
                        "key": keys[i],
                        "id": items[i]["id"],
                        "raw_output": output.text,
                        "prompt_tokens": output.prompt_tokens,
                        "completion_tokens": output.completion_tokens,
                        "finish_reason": output.finish_reason,
                    }
                )
            update(min(done + batch_size, len(todo)), len(todo))
    return len(keys) - len(todo)


def _key(
    spec: BenchmarkSpec,
    item: Item,
    query: Query,
    revision: str,
    generation: Generation,
    hashes: dict[Path, str],
) -> str:
    for path in query.files:
        if path not in hashes:
            hashes[path] = sha256_of(path)
    content = {
        "item": {k: v for k, v in item.items() if not k.startswith("_")},
        "inputs": [hashes[p] for p in query.files],
        "model": revision,
        "template": spec.template_hash,
        "generation": generation.model_dump(),
        "medlens": __version__,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _sample(
    kind: Kind, item: Item, query: Query, key: str, record: dict[str, Any] | None, hashes: dict[Path, str]
) -> dict[str, Any]:
    raw = (record or {}).get("raw_output", "")
    return {
        "id": item["id"],
        "inputs": {str(p): hashes[p] for p in query.files},
        "prompt": _prompt_text(query),
        "raw_output": raw,
        "prediction": kind.predict(raw, item, query.context),
        "target": kind.target(item),
        "group": kind.group(item),
        "scores": {},
        "key": key,
    }


def _prompt_text(query: Query) -> str:
    parts = []
    for message in query.messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
            parts.append("<image>" if part.get("type") == "image" else str(part.get("text", "")))
    return "\n".join(parts)


def _results(
    spec: BenchmarkSpec,
    samples: list[dict[str, Any]],
    backend: Backend,
    revision: str,
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
        "model_revision": revision,
        "untrained_test_model": backend.is_test_model,
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
