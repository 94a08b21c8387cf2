"""Benchmark: peak memory of ``medlens eval`` over few and many CT volumes (the streaming runner).

Run: ``.venv/bin/python bench/eval_memory.py [--few 3] [--many 30] [--slices 90] [--size 256]
[--questions 2] [--workdir DIR] [--json FILE]``

Writes ``--many`` synthetic CT phantoms as real DICOM series (cached in ``--workdir``, default
``bench/out/``), a condition benchmark asking ``--questions`` yes/no questions about each volume, and runs
``medlens.eval.runner.run_benchmark`` with ``test-tiny`` in a fresh process per size, over the first
``--few`` and then all ``--many`` volumes, recording each process's peak RSS (``ru_maxrss``). Each volume's
85 prepared slices are ``85 x size x size x 3`` bytes of RGB. A runner that held every prepared study until
the end would grow by about one prepared volume per added volume; the streaming runner keeps a batch.

Target: peak RSS growth per added volume below 10% of one prepared volume. The exit status is 1 when the
target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

DEFAULT_WORKDIR = Path(__file__).resolve().parent / "out"
TARGET_SHARE = 0.10
LABELS = ["liver lesion", "pleural effusion", "ascites", "kidney stone"]

_CHILD = """
import json, resource, sys, tempfile
from medlens.eval.runner import run_benchmark
spec, root, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
with tempfile.TemporaryDirectory() as out:
    results = run_benchmark(spec, "test-tiny", out_dir=out, data=root, limit=limit, n_resamples=100)
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "n_items": results["n_items"]}))
"""


def write_volumes(workdir: Path, count: int, slices: int, size: int) -> Path:
    """``count`` CT series under ``workdir/eval-memory-S-N/ct/volNN`` (reused when already written)."""
    from medlens.demo.phantom import ct_phantom, write_ct_series

    root = workdir / f"eval-memory-{slices}x{size}"
    for n in range(count):
        folder = root / "ct" / f"vol{n:02d}"
        if not (folder / ".done").exists():
            hu, _ = ct_phantom(n_slices=slices, size=size, seed=n)
            write_ct_series(hu, folder, seed=n)
            (folder / ".done").write_text("")
    return root


def write_benchmark(root: Path, count: int, questions: int) -> Path:
    """A condition benchmark over the volumes, ``questions`` consecutive questions per volume."""
    rows = [
        {"id": f"v{n}-{q}", "image": f"ct/vol{n:02d}", "label": LABELS[q % len(LABELS)], "target": "no"}
        for n in range(count)
        for q in range(questions)
    ]
    (root / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # paths relative to it
    spec = root / "eval-memory.yaml"
    spec.write_text(
        "name: eval-memory\n"
        "description: synthetic CT volumes, yes/no conditions\n"
        "kind: condition\n"
        "data: {path: items.jsonl}\n"
        "options: {what: CT volume}\n"
        'prompt: \'Is there "{label}" in the {what}? Answer with "Final Answer: yes" or "Final Answer: no".\'\n'
        "generation: {max_new_tokens: 4}\n"
        "metrics:\n  - {name: accuracy, fn: accuracy}\n"
    )
    return spec


def peak_rss(spec: Path, root: Path, items: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(spec), str(root), str(items)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"eval run failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--few", type=int, default=3)
    parser.add_argument("--many", type=int, default=30)
    parser.add_argument("--slices", type=int, default=90)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    root = write_volumes(args.workdir, args.many, args.slices, args.size)
    spec = write_benchmark(root, args.many, args.questions)
    few = peak_rss(spec, root, args.few * args.questions)
    many = peak_rss(spec, root, args.many * args.questions)
    prepared_mb = 85 * args.size * args.size * 3 / 1e6
    growth_mb = (many["peak_kb"] - few["peak_kb"]) / 1e3 / (args.many - args.few)
    share = growth_mb / prepared_mb
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "volumes": [args.few, args.many],
        "questions_per_volume": args.questions,
        "peak_rss_mb": [few["peak_kb"] / 1e3, many["peak_kb"] / 1e3],
        "prepared_volume_mb": prepared_mb,
        "growth_per_volume_mb": growth_mb,
        "growth_share_of_prepared_volume": share,
        "target_share": TARGET_SHARE,
    }
    print(f"{result['machine']}; {args.slices}-slice {args.size}x{args.size} CT, {args.questions} questions each")
    print(f"{'volumes':>8} {'items':>6} {'peak RSS MB':>12}")
    for volumes, run in ((args.few, few), (args.many, many)):
        print(f"{volumes:>8} {run['n_items']:>6} {run['peak_kb'] / 1e3:>12.1f}")
    print(f"one prepared volume: {prepared_mb:.1f} MB; growth per added volume: {growth_mb:.2f} MB ({share:.1%})")
    print(f"target: < {TARGET_SHARE:.0%} -> {'met' if share < TARGET_SHARE else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if share < TARGET_SHARE else 1


if __name__ == "__main__":
    sys.exit(main())
