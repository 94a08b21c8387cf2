"""Benchmark: gemma-3-270m greedy generation speed on three engines, side by side, on the same prompts.

Run: ``.venv/bin/python bench/llamacpp_speed.py [--max-new-tokens 64] [--repeat 5] [--threads N] [--json FILE]
[--engines llamacpp,server,transformers]`` (llama-cpp-python installed: ``make llamacpp``).

Engines (all loaded in this process, the server in a subprocess, and measured in turns, so that a change in the
machine's load hits all of them alike):
(a) llamacpp      the in-process ``llamacpp`` engine (``load_backend("llamacpp:gemma-3-270m")``), Q4_K_M kernels;
(b) server        ``python -m llama_cpp.server`` on loopback with the same file, through medlens's OpenAI backend
                  (``load_backend("openai:gemma-3-270m@URL")``): HTTP and JSON included;
(c) transformers  medlens's transformers engine (``load_backend("gemma-3-270m")``), the GGUF dequantised to
                  float32.

Every engine gets one warm-up request; then, in each round, each prompt goes to each engine twice: with
``max_new_tokens=1`` (time t1: prompt processing and the first token) and with ``--max-new-tokens`` (time tn,
n tokens). Every request starts with its own words, so llama.cpp's KV-cache reuse of a shared prefix cannot
shorten the prompt processing. Prompt tokens/s is prompt_tokens / t1; generated tokens/s is (n - 1) / (tn - t1).
Each figure is the median over prompts and rounds; ``load s`` is the time ``load_backend`` took (the server's
start-up included for (b)).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the llama.cpp server fixture's launcher lives with the tests

from servers import LlamaServer, gemma_270m_gguf, llamacpp_missing  # noqa: E402

from medlens.backends import Backend, GenerationRequest, load_backend  # noqa: E402

ENGINES = ("llamacpp", "server", "transformers")
REPORT = (
    "FINDINGS: PA and lateral views of the chest. The lungs are clear without focal consolidation. There is a "
    "small left pleural effusion with adjacent atelectasis of the left lower lobe. The cardiomediastinal "
    "silhouette is within normal limits. No pneumothorax. A 5 mm nodule projects over the right upper lobe. "
    "Degenerative changes of the thoracic spine."
)
PROMPTS = (
    f"{REPORT}\n\nWrite the impression of this chest X-ray report.",
    f"{REPORT}\n\nExplain these findings to the patient in plain words.",
    "Describe the typical presentation, work-up and treatment of community-acquired pneumonia in adults.",
)


def timed(backend: Backend, prompt: str, max_new_tokens: int) -> tuple[float, int, int]:
    """Seconds, prompt tokens and completion tokens of one greedy request."""
    request = GenerationRequest([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    (out,) = backend.generate([request])
    return time.perf_counter() - start, out.prompt_tokens, out.completion_tokens


class Engine:
    """One engine under test: its backend (and server), load time and measurements."""

    def __init__(self, name: str, threads: int) -> None:
        self.name, self.server = name, None
        start = time.perf_counter()
        if name == "llamacpp":
            self.backend = load_backend("llamacpp:gemma-3-270m", n_threads=threads)
        elif name == "server":
            self.server = LlamaServer(gemma_270m_gguf(), n_threads=threads)
            self.backend = load_backend(f"openai:gemma-3-270m@{self.server.start()}")
        else:
            import torch

            torch.set_num_threads(threads)
            self.backend = load_backend("gemma-3-270m", device="cpu", dtype="float32")
        self.load_s = time.perf_counter() - start
        self.prompt_rates: list[float] = []
        self.generation_rates: list[float] = []
        self.prompt_tokens: list[int] = []
        self.generated: list[int] = []

    def measure(self, prompt: str, max_new_tokens: int) -> None:
        """t1 (one new token) and tn (up to ``max_new_tokens``) for ``prompt``."""
        t1, prompt_tokens, _ = timed(self.backend, prompt, 1)
        tn, _, n = timed(self.backend, "Again. " + prompt, max_new_tokens)  # its own prefix: nothing cached
        self.prompt_rates.append(prompt_tokens / t1)
        self.prompt_tokens.append(prompt_tokens)
        self.generated.append(n)
        if n > 1 and tn > t1:
            self.generation_rates.append((n - 1) / (tn - t1))

    def result(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "load_s": self.load_s,
            "prompt_tokens_per_s": statistics.median(self.prompt_rates),
            "generated_tokens_per_s": statistics.median(self.generation_rates) if self.generation_rates else None,
            "prompt_tokens": sorted(set(self.prompt_tokens)),
            "generated_tokens": sorted(set(self.generated)),
        }

    def close(self) -> None:
        self.backend.close()
        if self.server is not None:
            self.server.close()


def run(names: list[str], threads: int, max_new_tokens: int, repeat: int) -> list[dict[str, Any]]:
    """Load every engine, warm each up, then measure them in turns: each round, each prompt, each engine."""
    engines = [Engine(name, threads) for name in names]
    try:
        for engine in engines:
            timed(engine.backend, "Warm-up. " + PROMPTS[0], 8)
        for round_ in range(repeat):
            for n, prompt in enumerate(PROMPTS):
                for engine in engines:
                    # a different first word for every request: llama.cpp reuses the KV cache of a shared prefix
                    engine.measure(f"Case {round_}-{n}. {prompt}", max_new_tokens)
        return [engine.result() for engine in engines]
    finally:
        for engine in engines:
            engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    missing = llamacpp_missing(server="server" in engines)
    if missing and {"llamacpp", "server"} & set(engines):
        print(missing, file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    rows = run(engines, args.threads, args.max_new_tokens, args.repeat)
    print(
        f"gemma-3-270m, greedy, {len(PROMPTS)} prompts x {args.repeat} rounds, up to {args.max_new_tokens} new "
        f"tokens, {args.threads} threads, {platform.machine()}, load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(f"{'engine':<14}{'load s':>8}{'prompt tok/s':>14}{'gen tok/s':>11}  prompt tokens, generated tokens")
    for row in rows:
        generation = row["generated_tokens_per_s"]
        print(
            f"{row['engine']:<14}{row['load_s']:>8.1f}{row['prompt_tokens_per_s']:>14.1f}"
            f"{generation if generation is None else format(generation, '.1f'):>11}  "
            f"{row['prompt_tokens']}, {row['generated_tokens']}"
        )
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
