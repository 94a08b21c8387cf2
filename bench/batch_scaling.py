"""Benchmark: ``medlens batch`` over synthetic CT studies, the local streaming runner against the Ray runner
with CPU workers for preparation, side by side in one run.

Run: ``.venv/bin/python bench/batch_scaling.py [--studies 24] [--slices 300] [--size 512] [--prepare-workers 2]
[--model test-tiny] [--workdir DIR] [--json FILE]``

The studies are written once (cached in ``--workdir``, default ``bench/out/batch_scaling/``): each a real,
uncompressed 300-slice DICOM CT series of its own phantom (seed = study number, so every row has its own
content and journal key). A JSONL manifest asks one ``qa`` question per study. Every approach reads the same
files from the page cache (an untimed pass reads every file first) and writes its own fresh output folder.

What is measured (each approach once, in this order, all in this process):

- ``prepare``: ``medlens.api.prepare_study`` of three studies in this process, one after the other: the
  prepare rate per CPU core (studies/s and slices/s), the figure the throughput model of docs/scale.md uses.
- ``local``: ``medlens.batch.run_batch(manifest, ...)`` without Ray (the streaming runner: prepare a batch,
  answer it, the next one), test-tiny answering.
- ``ray``: the same call with ``ray=RaySettings(cpus_per_prepare=1, cpus_per_replica=CORES)`` on a Ray
  started beforehand by this script, as on a cluster that is already up (Ray's own start-up is reported
  apart, ``ray_start_s``). Its ``num_cpus`` is the prepare workers plus the cores: the replica gets as many
  threads as the local run's model has (Ray sets a worker's thread count from its CPUs), and the
  ``--prepare-workers`` preparations run beside it, all on the same physical cores.

The target (PASS/FAIL line): the Ray run takes at most 1.15x the local run's wall time (its overhead under
15%). Results of both runs must be equal, envelope for envelope (timings aside): exit status 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import medlens
from medlens.api import prepare_study
from medlens.batch import run_batch
from medlens.demo.phantom import ct_phantom, write_ct_series
from medlens.io.worker_pool import usable_cores
from medlens.pipeline import RaySettings

QUESTION = "Is there a liver lesion?"
TARGET_RATIO = 1.15


def build_studies(workdir: Path, studies: int, slices: int, size: int) -> Path:
    """The studies and their manifest (written once; kept while their stamp matches)."""
    stamp = {"studies": studies, "slices": slices, "size": size, "medlens": medlens.__version__}
    stamp_file = workdir / "stamp.json"
    manifest = workdir / "manifest.jsonl"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp and manifest.exists():
        return manifest
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    rows = []
    for number in range(studies):
        hu, _ = ct_phantom(slices, size, seed=number)
        write_ct_series(hu, workdir / f"study-{number:02d}", shuffle=True, seed=number)
        rows.append({"id": f"study-{number:02d}", "input": f"study-{number:02d}", "question": QUESTION})
        print(f"  wrote study {number + 1}/{studies}", file=sys.stderr)
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    stamp_file.write_text(json.dumps(stamp) + "\n")
    return manifest


def warm_page_cache(workdir: Path) -> None:
    for path in workdir.rglob("*"):
        if path.is_file():
            path.read_bytes()


def prepare_rate(workdir: Path, slices: int, count: int = 3) -> dict[str, float]:
    """Studies and slices prepared per second on one core (in this process, one after the other)."""
    prepare_study(workdir / "study-00")  # imports and caches warm
    start = time.perf_counter()
    for number in range(count):
        prepare_study(workdir / f"study-{number:02d}")
    seconds = (time.perf_counter() - start) / count
    return {
        "seconds_per_study": round(seconds, 3),
        "studies_per_s": round(1 / seconds, 3),
        "slices_per_s": round(slices / seconds, 1),
    }


def envelopes(out_dir: Path) -> dict[str, Any]:
    """The results by row id, timings and run-specific fields dropped."""
    found = {}
    for line in (out_dir / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        found[row["row_id"]] = _without_timings(row)
    return found


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in ("timings", "wall_s", "created")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def run(manifest: Path, out: Path, model: str, ray: RaySettings | None, batch_size: int) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = run_batch(manifest, model=model, out_dir=out, task="qa", ray=ray, batch_size=batch_size)
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 3), "ok": summary["ok"], "failed": summary["failed"], "rows": summary["rows"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--prepare-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="test-tiny")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out" / "batch_scaling")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import ray

    workdir = args.workdir.resolve()
    print(f"studies: {args.studies} x {args.slices} slices of {args.size}x{args.size} in {workdir}", file=sys.stderr)
    manifest = build_studies(workdir, args.studies, args.slices, args.size)
    warm_page_cache(workdir)
    report: dict[str, Any] = {
        "machine": {"cores": usable_cores(), "python": platform.python_version(), "ray": ray.__version__},
        "studies": args.studies,
        "slices": args.slices,
        "size": args.size,
        "prepare_workers": args.prepare_workers,
        "model": args.model,
        "load_before": os.getloadavg()[0],
    }
    report["prepare"] = prepare_rate(workdir, args.slices)
    with tempfile.TemporaryDirectory(prefix="medlens-batch-bench-") as tmp:
        report["local"] = run(manifest, Path(tmp) / "local", args.model, None, args.batch_size)
        start = time.perf_counter()
        cores = usable_cores()
        ray.init(
            num_cpus=args.prepare_workers + cores,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
        report["ray_start_s"] = round(time.perf_counter() - start, 3)
        settings = RaySettings(address="local", cpus_per_prepare=1, cpus_per_replica=cores)
        try:
            report["ray"] = run(manifest, Path(tmp) / "ray", args.model, settings, args.batch_size)
        finally:
            ray.shutdown()
        same = envelopes(Path(tmp) / "local") == envelopes(Path(tmp) / "ray")
    report["identical_results"] = same
    report["ratio"] = round(report["ray"]["wall_s"] / report["local"]["wall_s"], 3)
    report["load_after"] = os.getloadavg()[0]
    passed = report["ratio"] <= TARGET_RATIO and same and report["local"]["ok"] == report["ray"]["ok"] == args.studies

    prep = report["prepare"]
    print(
        f"prepare, one core: {prep['seconds_per_study']:.2f} s/study = {prep['studies_per_s']:.2f} studies/s = "
        f"{prep['slices_per_s']:.0f} slices/s"
    )
    print(f"local streaming : {report['local']['wall_s']:8.2f} s  ({report['local']['ok']} results)")
    print(
        f"ray ({args.prepare_workers} prepare workers): {report['ray']['wall_s']:8.2f} s  "
        f"({report['ray']['ok']} results); Ray start-up before it {report['ray_start_s']:.2f} s"
    )
    print(f"ray / local     : {report['ratio']:.3f}  (target <= {TARGET_RATIO}); identical results: {same}")
    print(f"{'PASS' if passed else 'FAIL'}: Ray overhead under 15% of the local time, same results")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
