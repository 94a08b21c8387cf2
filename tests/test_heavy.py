"""Checks that need what CI does not have: real MedGemma weights, or a CUDA GPU. Skipped with the reason."""

from __future__ import annotations

import os

import pytest

from medlens.demo.phantom import ct_phantom, write_ct_series

REAL_MODEL = os.environ.get("MEDLENS_REAL_MODEL")


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    hu, _ = ct_phantom(n_slices=90, size=256)
    write_ct_series(hu, folder)
    return folder


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU on this machine")
def test_test_tiny_on_gpu_uses_bf16(phantom):
    from medlens.api import ask
    from medlens.backends import load_backend

    backend = load_backend("test-tiny")
    assert backend.device.startswith("cuda") and str(backend.model.dtype) == "torch.bfloat16"
    result = ask(phantom, "Is there a lesion? Final Answer: yes or no.", backend)
    assert result["n_images"] == 85 and result["untrained_test_model"]


@pytest.mark.slow
@pytest.mark.skipif(not REAL_MODEL, reason="set MEDLENS_REAL_MODEL to a local MedGemma 1.5 directory to run")
def test_real_medgemma_answers_the_ct_question(phantom):
    from medlens.api import ask

    result = ask(
        phantom,
        'Is there "liver lesion" in the CT volume? Answer with "Final Answer: yes" or "Final Answer: no".',
        REAL_MODEL,
        max_new_tokens=256,
    )
    assert not result["untrained_test_model"]
    assert result["final_answer"] in ("yes", "no"), result["answer"]
