"""Benchmark for a lent GPU: 85-slice CT studies per hour with a full-size MedGemma 1.5 4B configuration.

Run: ``python bench/gpu_throughput.py [--studies 4] [--questions 18] [--engines transformers,vllm]
[--size full|small] [--json FILE]``

Throughput does not depend on weight values, so the model is MedGemma 1.5 4B's architecture (Gemma 3 4B text
tower: 34 layers, hidden 2560; SigLIP-So400m vision tower at 896 px, 256 tokens per image) with random bf16
weights, built on the GPU; the tokenizer is test-tiny's (prompt text is a few hundred tokens; the 85 x 256
image tokens dominate). Each study is 85 RGB slices (random pixels, 512 x 512, resized by the processor like
real slices) and the prompt is MedGemma 1.5's volume layout (instruction, 85 x (image, "SLICE n"), question).

Side by side in one run, per engine that is installed:
(a) short answer: one yes/no question per study, 8 new tokens, ``--studies`` studies -> studies/hour;
(b) 18 questions about one volume, independent requests vs one generate call (transformers: shared image
    encoding + prefill; vLLM: prefix caching) -> the prefix-reuse gain.
The roofline is computed for the machine: vision encoder ~464 TFLOP and language prefill ~169 TFLOP per
85-slice study (docs/performance.md), over the GPU's dense bf16 peak (989 TFLOP/s for H100/H200 SXM).
``--size small`` runs the same code on a scaled-down configuration (a CPU check of the script). Prints the
machine. Meant to finish in under 8 minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

STUDY_TFLOP = 464.0 + 169.0
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
QUESTION = 'Is there "{label}" in the CT volume? Answer with "Final Answer: yes" or "Final Answer: no".'
LABELS = ["pleural effusion", "pneumothorax", "liver lesion", "kidney stone", "ascites", "splenomegaly"] * 3


def medgemma_config(size: str, tokenizer: Any) -> Any:
    """Gemma3Config of MedGemma 1.5 4B (``full``) or a small one of the same shape (``small``)."""
    from transformers import Gemma3Config

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")}
    full = size == "full"
    text = {
        "vocab_size": 262208 if full else len(tokenizer),
        "hidden_size": 2560 if full else 128,
        "intermediate_size": 10240 if full else 256,
        "num_hidden_layers": 34 if full else 2,
        "num_attention_heads": 8 if full else 2,
        "num_key_value_heads": 4 if full else 1,
        "head_dim": 256 if full else 64,
        "query_pre_attn_scalar": 256 if full else 64,
        "sliding_window": 1024,
        "max_position_embeddings": 131072 if full else 32768,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0} if full else None,
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152 if full else 64,
        "intermediate_size": 4304 if full else 128,
        "num_hidden_layers": 27 if full else 2,
        "num_attention_heads": 16 if full else 2,
        "image_size": 896 if full else 224,
        "patch_size": 14,
        "vision_use_head": False,
    }
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=256 if full else 16,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )


def write_model(folder: Path, size: str) -> Path:
    """A random-weight MedGemma-shaped model folder (bf16 on a GPU) that every engine can load."""
    import torch
    from transformers import Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    from medlens.models.gemma_tiny import CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer()
    config = medgemma_config(size, tokenizer)
    image_size = config.vision_config.image_size
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(
            size={"height": image_size, "width": image_size},
            resample=2,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            do_pan_and_scan=False,
        ),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=config.mm_tokens_per_image,
    )
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Gemma3ForConditionalGeneration(config).to(dtype)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    return folder


def study(seed: int, side: int = 512) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(85)]


def requests_for(images: list[np.ndarray], labels: list[str], max_new_tokens: int) -> list[Any]:
    from medlens.backends import GenerationRequest
    from medlens.prompts import volume_messages

    return [
        GenerationRequest(volume_messages(images, QUESTION.format(label=label)), max_new_tokens=max_new_tokens)
        for label in labels
    ]


def timed(fn: Any) -> tuple[float, Any]:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run_engine(engine: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    from medlens.backends import load_backend

    options = {"gpu_memory_utilization": 0.85} if engine == "vllm" else {}
    load_s, backend = timed(lambda: load_backend(str(folder), engine, **options))
    volumes = [study(n) for n in range(args.studies + 1)]
    backend.generate(requests_for(volumes[-1], LABELS[:1], 8))  # warm-up (engine build, kernels)
    short_s, outputs = timed(lambda: [backend.generate(requests_for(v, LABELS[:1], 8))[0] for v in volumes[:-1]])
    per_study = short_s / args.studies
    questions = requests_for(volumes[0], LABELS[: args.questions], 8)
    independent_s, alone = timed(lambda: [backend.generate([r])[0] for r in questions])
    shared_s, together = timed(lambda: backend.generate(questions))
    same = [o.text for o in alone] == [o.text for o in together]
    backend.close()
    return {
        "engine": engine,
        "load_s": round(load_s, 2),
        "prompt_tokens": outputs[0].prompt_tokens,
        "short_answer_s_per_study": round(per_study, 3),
        "studies_per_hour": round(3600 / per_study),
        f"{args.questions}_questions_independent_s": round(independent_s, 2),
        f"{args.questions}_questions_shared_s": round(shared_s, 2),
        "prefix_reuse_gain": round(independent_s / shared_s, 2),
        "shared_answers_identical": same,
    }


def machine() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return f"CPU ({platform.machine()}), no CUDA GPU", None
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}", peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--questions", type=int, default=18)
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--size", choices=["full", "small"], default="full")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import importlib.util

    name, peak = machine()
    print(f"machine: {name}; model: MedGemma 1.5 4B configuration ({args.size}), random weights")
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="medgemma-random-"))
    build_s, _ = timed(lambda: write_model(folder, args.size))
    print(f"random model written in {build_s:.1f} s to {folder}")
    rows = []
    for engine in args.engines.split(","):
        if engine == "vllm" and importlib.util.find_spec("vllm") is None:
            print("vllm: not installed here, skipped")
            continue
        rows.append(run_engine(engine, folder, args))
        print(json.dumps(rows[-1]))
    if peak and args.size == "full":
        roofline = STUDY_TFLOP / peak
        print(f"roofline at {peak:.0f} TFLOP/s bf16 dense: {roofline:.2f} s per study ({3600 / roofline:.0f}/hour)")
        for row in rows:
            print(f"{row['engine']}: {row['short_answer_s_per_study'] / roofline:.2f}x the roofline time")
    if args.json:
        args.json.write_text(json.dumps({"machine": name, "rows": rows}, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if all(r["shared_answers_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
