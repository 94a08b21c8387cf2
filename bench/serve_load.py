"""Benchmark: ``medlens serve`` on loopback under load, test-tiny, the figures of docs/serve.md.

Run: ``.venv/bin/python bench/serve_load.py [--requests 200] [--concurrency 16] [--batch-size 8] [--json FILE]``

Starts the server in this process (uvicorn in a thread, a free 127.0.0.1 port, its own temporary data dir) with
the built-in test-tiny model, then sends ``--requests`` POST /v1/analyze (one 256x256 radiograph, one question,
4 new tokens) with ``--concurrency`` in flight, twice: with the server's request batching (``--batch-size``)
and without it (batch size 1), side by side. Prints requests/s and p50/p95 latency of each and their ratio.
Exit status 1 when any request failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from medlens_server import serve
from serve_load import run_load
from test_serve_load import _radiograph


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from medlens.backends import load_backend

    backend = load_backend("test-tiny")
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        image = _radiograph(Path(tmp) / "cxr.png")
        for name, batch in (("batched", args.batch_size), ("one at a time", 1)):
            with serve(backend, batch_size=batch, max_queue=max(32, args.concurrency * 2)) as running:
                result = run_load(running.url, image, n=args.requests, concurrency=args.concurrency, deadline_s=900)
            figures[name] = result
            print(f"{name:14s} (batch size {batch}): {result.summary()}")
    a, b = figures["batched"], figures["one at a time"]
    print(
        f"batched / one at a time: {len(a.latencies) / a.wall_s / (len(b.latencies) / b.wall_s):.2f}x requests/s, "
        f"p50 {a.quantile(0.5) / b.quantile(0.5):.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps({k: v.__dict__ for k, v in figures.items()}, indent=2) + "\n")
    return 1 if a.errors or b.errors else 0


if __name__ == "__main__":
    sys.exit(main())
