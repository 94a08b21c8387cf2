"""Parity on a GPU: medlens's vLLM backend against its transformers backend, greedy, on the same prompts.

Run: ``python bench/vllm_parity.py [--models test-tiny,random-4b] [--tokens 16] [--json FILE]`` where vLLM is
installed (a CUDA machine).

For ``test-tiny`` and a full-size MedGemma 1.5 4B configuration with random weights (``random-4b``, built by
``bench/gpu_throughput.py``'s ``write_model``), three prompts in MedGemma's layouts: text only, one image (a
512 x 512 radiograph-like RGB image), and an 85-slice volume. Both engines get the same chat messages; the
script prints, per prompt, the prompt tokens of each engine and how many leading generated tokens agree
(text compared through the tokenizer). Exit status 1 when prompt token counts differ. Differences after a few
tokens are expected where logits nearly tie (bf16; and Gemma 3's bidirectional image attention, which some
vLLM V1 versions approximate: docs/engines.md). On CPUs vLLM's Gemma 3 image path does not run (torchvision);
tests/test_backend_vllm_cpu.py checks text parity there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_throughput import write_model


def prompts() -> dict[str, list[dict[str, Any]]]:
    from medlens.prompts import image_messages, text_messages, volume_messages

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    volume = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(85)]
    return {
        "text": text_messages("What is a pleural effusion? Answer in one sentence."),
        "one image": image_messages([image], "Describe the findings in this chest X-ray."),
        "85 slices": volume_messages(volume, 'Is there "liver lesion" in the CT volume? Final Answer: yes or no.'),
    }


def leading_agreement(tokenizer: Any, a: str, b: str) -> int:
    ids_a = tokenizer(a, add_special_tokens=False)["input_ids"]
    ids_b = tokenizer(b, add_special_tokens=False)["input_ids"]
    same = 0
    for x, y in zip(ids_a, ids_b, strict=False):
        if x != y:
            break
        same += 1
    return same


def compare(model: str, tokens: int) -> list[dict[str, Any]]:
    from medlens.backends import GenerationRequest, load_backend

    cases = prompts()
    requests = [GenerationRequest(messages, max_new_tokens=tokens) for messages in cases.values()]
    with load_backend(model, "transformers") as reference:
        ours = [reference.generate_one(r) for r in requests]
        tokenizer = reference.tokenizer
    with load_backend(model, "vllm", gpu_memory_utilization=0.8) as engine:
        theirs = engine.generate(requests)
    rows = []
    for name, a, b in zip(cases, ours, theirs, strict=True):
        rows.append(
            {
                "model": model,
                "prompt": name,
                "prompt_tokens": [a.prompt_tokens, b.prompt_tokens],
                "agreeing_leading_tokens": leading_agreement(tokenizer, a.text, b.text),
                "of": min(a.completion_tokens, b.completion_tokens),
                "identical": (a.text, a.completion_tokens) == (b.text, b.completion_tokens),
            }
        )
        print(json.dumps(rows[-1]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="test-tiny,random-4b")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        if model == "random-4b":
            model = str(write_model(Path(tempfile.mkdtemp(prefix="medgemma-random-")), "full"))
        rows += compare(model, args.tokens)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["prompt_tokens"][0] == r["prompt_tokens"][1] for r in rows) else 1


if __name__ == "__main__":  # vLLM starts its engine in spawned processes
    sys.exit(main())
