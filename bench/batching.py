"""Benchmark: 16 different requests (texts, some with images), one at a time against batched generation.

Run: ``.venv/bin/python bench/batching.py [--model test-tiny] [--requests 16] [--batch-size 8]
[--max-new-tokens N] [--repeat 3] [--device cpu] [--threads N] [--json FILE]``

The requests share no prefix: each has its own question (clinical questions of different lengths), and every
third one has one or two random RGB images of its own size, so the batch mixes prompt lengths and image counts.
Greedy decoding, the model's default ``max_new_tokens`` (16 for ``test-tiny``) unless given.

In one process, after a warm-up of both paths, each round times:
(a) one at a time  ``backend.generate(requests)`` with ``batch_size=1``: each request is encoded and run
                   through its own ``model.generate``, as before batching existed;
(b) batched        the same call with ``batch_size=--batch-size``: the requests are sorted by length and run
                   left-padded, ``batch_size`` rows per ``model.generate`` call.
The fastest round of each is reported. The answers of (a) and (b) must be identical (text, prompt and
completion token counts, finish reason), and every request of (b) must have run in a batch. Target: (b) at
least 3x faster than (a). The exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

TARGET_SPEEDUP = 3.0
QUESTIONS = [
    "Describe the chest radiograph.",
    "Is there a pleural effusion?",
    "What is the most likely diagnosis? Answer with one word.",
    "Which organ is abnormal?",
    "Where is the lesion located? Give the lobe and the side.",
    "Is the heart size normal?",
    "Findings: no acute intracranial hemorrhage. What is the impression?",
    "Is there a pneumothorax? Final Answer: yes or no.",
    "Summarise the report: the lungs are clear, the heart size is normal, there is a 5 mm nodule in the right "
    "upper lobe and mild atelectasis of the left lower lobe.",
    "What does a T2 hyperintense lesion in the periventricular white matter suggest?",
    "Hemoglobin 13.5 g/dL (12.0-16.0). Is this normal?",
    "A. pneumonia B. edema C. atelectasis D. normal. Which option is correct?",
    "Compared with the prior image, is the opacity improved, stable or worsened?",
    "List the tests in this lab report with their units.",
    "Is there consolidation in the right lower lobe consistent with pneumonia?",
    "no",
]


def build_requests(count: int, max_new_tokens: int | None) -> list[Any]:
    """``count`` different requests; every third one has one or two images of its own size."""
    import numpy as np

    from medlens.backends import GenerationRequest

    requests = []
    for n in range(count):
        question = QUESTIONS[n % len(QUESTIONS)] + ("" if n < len(QUESTIONS) else f" (case {n})")
        rng = np.random.default_rng(n)
        images = []
        if n % 3 == 1:
            images = [rng.integers(0, 256, (48 + 24 * n, 64 + 16 * k, 3), dtype=np.uint8) for k in range(1 + n % 2)]
        content = [*({"type": "image", "image": image} for image in images), {"type": "text", "text": question}]
        requests.append(
            GenerationRequest(messages=[{"role": "user", "content": content}], max_new_tokens=max_new_tokens)
        )
    return requests


def timed(run: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def signature(outputs: list[Any]) -> list[tuple[str, int, int, str]]:
    return [(o.text, o.prompt_tokens, o.completion_tokens, o.finish_reason) for o in outputs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from medlens.backends import load_backend

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    requests = build_requests(args.requests, args.max_new_tokens)
    options = {"device": args.device} if args.device else {}
    load_seconds, backend = timed(lambda: load_backend(args.model, **options))

    def run(size: int) -> tuple[float, list[Any]]:
        backend.batch_size = size
        return timed(lambda: backend.generate(requests))

    run(1)  # warm-up of both paths
    run(args.batch_size)
    alone_times, batched_times = [], []
    best: dict[str, tuple[float, list[Any]]] = {}
    for _ in range(args.repeat):
        for name, size, times in (("alone", 1, alone_times), ("batched", args.batch_size, batched_times)):
            seconds, outputs = run(size)
            times.append(seconds)
            if name not in best or seconds < best[name][0]:
                best[name] = seconds, outputs
    (t_alone, alone), (t_batched, batched) = best["alone"], best["batched"]
    speedup = t_alone / t_batched
    identical = signature(alone) == signature(batched)
    reruns = sum(int(o.timings.get("tie_rerun", 0)) for o in batched)
    sizes = sorted({int(o.timings.get("batch_size", 1)) for o in batched})
    tokens = sum(o.completion_tokens for o in batched)
    parts = {  # of the fastest round
        name: {key: sum(o.timings.get(key, 0.0) for o in outputs) for key in ("preprocess", "generate")}
        for name, outputs in (("alone", alone), ("batched", batched))
    }
    with_images = sum(1 for r in requests if any(p.get("type") == "image" for p in r.messages[0]["content"]))

    print(
        f"model {args.model} ({backend.device}, {backend.dtype}); {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; torch threads {_torch_threads()}; load {load_seconds:.2f} s"
    )
    lengths = [o.prompt_tokens for o in batched]
    print(
        f"{len(requests)} requests ({with_images} with images), prompts {min(lengths)}-{max(lengths)} tokens, "
        f"{tokens} tokens generated; batch size {args.batch_size} (batches of {'/'.join(map(str, sizes))}); "
        f"best of {args.repeat}"
    )
    print(f"{'':18}{'seconds':>9}{'s/request':>11}{'tokens/s':>10}{'preprocess':>12}{'generate':>10}")
    for name, label, seconds in (("alone", "(a) one at a time", t_alone), ("batched", "(b) batched", t_batched)):
        print(
            f"{label:18}{seconds:9.3f}{seconds / len(requests):11.4f}{tokens / seconds:10.1f}"
            f"{parts[name]['preprocess']:12.3f}{parts[name]['generate']:10.3f}"
        )
    print(f"all rounds: (a) {_rounds(alone_times)}; (b) {_rounds(batched_times)}")
    print(f"speed-up {speedup:.2f}x; answers identical: {identical}; rows recomputed alone (near ties): {reruns}")
    checks = {
        f"batched at least {TARGET_SPEEDUP:g}x faster": speedup >= TARGET_SPEEDUP,
        "answers identical": identical,
        "every request ran in a batch": all("batch_size" in o.timings for o in batched) or args.batch_size == 1,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "device": str(backend.device),
                    "requests": len(requests),
                    "batch_size": args.batch_size,
                    "torch_threads": _torch_threads(),
                    "completion_tokens": tokens,
                    "alone_s": alone_times,
                    "batched_s": batched_times,
                    "speedup": speedup,
                    "identical": identical,
                    "tie_reruns": reruns,
                    "checks": checks,
                },
                indent=2,
            )
            + "\n"
        )
    backend.close()
    return 0 if all(checks.values()) else 1


def _rounds(times: list[float]) -> str:
    return ", ".join(f"{t:.3f}" for t in times)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="test-tiny", help="model to run (default test-tiny)")
    parser.add_argument("--requests", type=int, default=16, help="different requests (default 16)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per model.generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap per request (default: the model's)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; the fastest is shown (default 3)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
