"""Benchmark: how long a cold process takes to load ``test-tiny`` and answer, against the bare ``import torch`` floor.

Run: ``.venv/bin/python bench/startup.py [--repeat 3] [--json FILE]``

Every measurement is a fresh Python subprocess (nothing imported yet; the OS page cache is warm after the
first round), timed from outside, interpreter start-up included:

(a) floor        ``python -c "import torch"``: no program that runs a torch model starts faster.
(b) libraries    ``import torch`` + the transformers modules a Gemma 3 load needs (modeling and processing
                 utilities, the Gemma 3 classes): what transformers adds to (a) before any file is read.
(c) test-tiny    ``medlens.backends.load_backend("test-tiny")`` + one greedy generated token for a text-only
                 request: the CLI's model start-up (``medlens ask ... --model test-tiny`` adds reading and
                 preparing the input, ~0.2 s for one radiograph, and the CLI's own imports, ~0.5 s).

test-tiny is built once into a private cache (``MEDLENS_CACHE``, a temporary folder) before the rounds, so the
rounds measure loading, not building. Prints min / median / max seconds per line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR = "import torch"
LIBRARIES = (
    "import torch, transformers.modeling_utils, transformers.processing_utils\n"
    "from transformers.models.gemma3 import modeling_gemma3, processing_gemma3"
)
TINY = (
    "from medlens.backends import GenerationRequest, load_backend\n"
    "backend = load_backend('test-tiny', 'transformers')\n"
    "out = backend.generate([GenerationRequest([{'role': 'user', 'content': 'Is it normal?'}], max_new_tokens=1)])\n"
    "assert out[0].completion_tokens == 1, out"
)
CASES = {"(a) import torch (floor)": FLOOR, "(b) + transformers Gemma 3 modules": LIBRARIES, "(c) test-tiny": TINY}


def timed(code: str, env: dict[str, str]) -> float:
    """Seconds for a fresh interpreter to run ``code``."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, timeout=600)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medlens-startup-") as cache:
        env = {**os.environ, "MEDLENS_CACHE": cache}
        timed(TINY, env)  # builds test-tiny into the private cache (and warms the page cache)
        results: dict[str, list[float]] = {name: [] for name in CASES}
        for _ in range(args.repeat):  # interleaved, so load from other processes hits every case alike
            for name, code in CASES.items():
                results[name].append(timed(code, env))
    floor = statistics.median(results["(a) import torch (floor)"])
    print(f"cold start-up, {args.repeat} fresh processes each, seconds (min / median / max):")
    for name, seconds in results.items():
        median = statistics.median(seconds)
        print(
            f"  {name:36s} {min(seconds):5.2f} / {median:5.2f} / {max(seconds):5.2f}"
            f"   median - floor {median - floor:+5.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
