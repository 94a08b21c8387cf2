"""Benchmark: N yes/no questions about one 85-slice CT volume, with and without shared-prefix reuse.

Run: ``.venv/bin/python bench/shared_prefix.py [--model test-tiny] [--questions 18] [--slices 300] [--size 512]
[--repeat 1] [--device cpu] [--workdir DIR] [--json FILE]``

The volume is a synthetic CT phantom written once (cached in ``--workdir``, default ``bench/out/``) as a real
DICOM series of ``--slices`` slices of ``--size`` pixels, and prepared with ``medlens.api.prepare_study``
(85 slices sampled equidistantly, three CT windows, RGB uint8 at full size), so the processor resizes and
normalises realistic images. The prompts are MedGemma 1.5's volume layout (``medlens.prompts.volume_messages``):
instruction, 85 x (image, "SLICE n"), then one question per request, greedy decoding.

In one process, after a warm-up request, each round times:
(a) independent  ``backend.generate([request])`` once per question: every request converts, resizes and
                 encodes the 85 images and prefills the whole prompt again;
(b) shared       ``backend.generate(requests)`` once: the transformers backend groups the requests by their
                 shared prefix, processes and encodes the images and prefills the prefix once, and continues
                 every question from a copy of that KV cache.
The fastest round of each is reported. The answers of (a) and (b) must be identical (text, prompt and
completion token counts). Target: (b) at least 5x faster than (a). The exit status is 1 when the answers
differ or the target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_WORKDIR = Path(__file__).resolve().parent / "out"
TARGET_SPEEDUP = 5.0
LABELS = [
    "pleural effusion",
    "pneumothorax",
    "liver lesion",
    "kidney stone",
    "ascites",
    "splenomegaly",
    "lymphadenopathy",
    "aortic aneurysm",
    "bowel obstruction",
    "free air",
    "gallstones",
    "hydronephrosis",
    "pancreatitis",
    "appendicitis",
    "fracture",
    "atelectasis",
    "consolidation",
    "pulmonary nodule",
]


def series_folder(workdir: Path, slices: int, size: int) -> Path:
    """The phantom as a DICOM series, written once (atomically) and reused."""
    from medlens.demo.phantom import ct_phantom, write_ct_series

    folder = workdir / f"shared-prefix-ct-{slices}x{size}"
    if folder.is_dir():
        return folder
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=workdir))
    try:
        hu, _ = ct_phantom(n_slices=slices, size=size)
        write_ct_series(hu, tmp)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def question(label: str) -> str:
    return f'Is there "{label}" in the CT volume? Answer with "Final Answer: yes" or "Final Answer: no".'


def timed(run: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from medlens.api import prepare_study
    from medlens.backends import GenerationRequest, load_backend
    from medlens.prompts import volume_messages

    folder = series_folder(args.workdir, args.slices, args.size)
    prepare_seconds, prepared = timed(lambda: prepare_study(folder))
    images = prepared.images
    labels = [LABELS[i % len(LABELS)] + ("" if i < len(LABELS) else f" ({i})") for i in range(args.questions)]
    requests = [GenerationRequest(messages=volume_messages(images, question(label))) for label in labels]
    load_seconds, backend = timed(lambda: load_backend(args.model, **({"device": args.device} if args.device else {})))
    backend.generate([GenerationRequest(messages=volume_messages(images[:2], question("warm-up")))])

    independent_times, shared_times = [], []
    for _ in range(args.repeat):
        seconds, independent = timed(lambda: [backend.generate([request])[0] for request in requests])
        independent_times.append(seconds)
        seconds, shared = timed(lambda: backend.generate(requests))
        shared_times.append(seconds)
    t_independent, t_shared = min(independent_times), min(shared_times)
    speedup = t_independent / t_shared
    signature = [(o.text, o.prompt_tokens, o.completion_tokens, o.finish_reason) for o in independent]
    identical = signature == [(o.text, o.prompt_tokens, o.completion_tokens, o.finish_reason) for o in shared]
    reused = all(o.timings.get("prefix_reused") == 1.0 for o in shared)
    parts = {key: sum(o.timings.get(key, 0.0) for o in shared) for key in ("preprocess", "prefill", "generate")}

    print(
        f"model {args.model} ({backend.device}, {backend.dtype}); {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; torch threads {_torch_threads()}"
    )
    print(
        f"volume: {args.slices} slices of {args.size}x{args.size} -> {len(images)} images "
        f"({images[0].shape[1]}x{images[0].shape[0]}), prepare_study {prepare_seconds:.2f} s; load {load_seconds:.2f} s"
    )
    print(
        f"{len(requests)} questions, prompt {shared[0].prompt_tokens} tokens, shared prefix "
        f"{int(shared[0].timings.get('prefix_tokens', 0))} tokens, {sum(o.completion_tokens for o in shared)} "
        f"tokens generated; best of {args.repeat}"
    )
    print(f"(a) independent requests  {t_independent:8.2f} s   {t_independent / len(requests):6.3f} s/question")
    print(
        f"(b) shared prefix         {t_shared:8.2f} s   {t_shared / len(requests):6.3f} s/question  "
        f"(preprocess {parts['preprocess']:.2f}, prefill {parts['prefill']:.2f}, generate {parts['generate']:.2f})"
    )
    print(f"speed-up {speedup:.1f}x; answers identical: {identical}; prefix reused in every request: {reused}")
    checks = {
        f"shared prefix at least {TARGET_SPEEDUP:g}x faster": speedup >= TARGET_SPEEDUP,
        "answers identical": identical,
        "prefix reused": reused,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "device": str(backend.device),
                    "questions": len(requests),
                    "slices": args.slices,
                    "size": args.size,
                    "prompt_tokens": shared[0].prompt_tokens,
                    "prefix_tokens": shared[0].timings.get("prefix_tokens"),
                    "independent_s": independent_times,
                    "shared_s": shared_times,
                    "speedup": speedup,
                    "identical": identical,
                    "checks": checks,
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if all(checks.values()) else 1


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="test-tiny", help="model to run (default test-tiny)")
    parser.add_argument("--questions", type=int, default=18, help="questions about the volume (default 18)")
    parser.add_argument("--slices", type=int, default=300, help="slices in the series (default 300)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns per slice (default 512)")
    parser.add_argument("--repeat", type=int, default=1, help="timed rounds; the fastest is shown (default 1)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache folder for the series")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
