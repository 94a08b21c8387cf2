"""Shared-prefix reuse: questions about one volume are encoded and prefilled once, with the same answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medlens.backends import GenerationOutput, GenerationRequest
from medlens.backends.prefix_cache import common_prefix_length, group_by_prefix, image_digest, prefix_key
from medlens.prompts import volume_messages

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


def _question(label: str) -> str:
    return f'Is there "{label}" in the CT volume? Answer with "Final Answer: yes" or "Final Answer: no".'


def _signature(output: GenerationOutput) -> tuple[str, int, int, str]:
    return output.text, output.prompt_tokens, output.completion_tokens, output.finish_reason


def _text_request(text: str) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": [{"type": "text", "text": text}]}])


# --- grouping (no model) -----------------------------------------------------------------------------------


def _image(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_grouping_keeps_order_and_compares_pixels() -> None:
    a, b = [_image(1), _image(2)], [_image(3), _image(4)]
    a_copy = [image.copy() for image in a]
    batch = [
        volume_messages(a, "q1"),
        volume_messages(b, "q1"),
        volume_messages(a_copy, "q2"),  # other arrays, same pixels: same prefix
        [{"role": "user", "content": "plain text, nothing to share"}],
        volume_messages(b, "q2"),
        volume_messages(a, "q3", instruction="Another instruction for {n} slices."),
        volume_messages(a[::-1], "q4"),  # same images, other order
    ]
    assert group_by_prefix(batch) == [[0, 2], [1, 4], [3], [5], [6]]


def test_prefix_key_needs_a_trailing_question() -> None:
    images = [_image(1)]
    assert prefix_key(volume_messages(images, "q")) == prefix_key(volume_messages(images, "other question"))
    ends_with_image = [
        {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image", "image": images[0]}]}
    ]
    assert prefix_key(ends_with_image) is None
    assert prefix_key([{"role": "user", "content": [{"type": "text", "text": "only a question"}]}]) is None
    assert prefix_key([{"role": "assistant", "content": [{"type": "text", "text": "x"}]}]) is None
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "q"}]}]
    assert prefix_key(system) is not None  # the system message is a prefix


def test_image_digest_and_common_prefix() -> None:
    image = _image(5)
    assert image_digest(image) == image_digest(image.copy())
    assert image_digest(image) != image_digest(image.astype(np.int16))  # dtype counts
    assert image_digest(image) != image_digest(image.reshape(4, 16, 3))  # shape counts
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2], [1, 2]]) == 2 and common_prefix_length([]) == 0


# --- test-tiny ---------------------------------------------------------------------------------------------

pytest.importorskip("torch")
pytest.importorskip("transformers")

from medlens.backends.transformers_backend import TransformersBackend  # noqa: E402


@pytest.fixture
def backend(tiny_backend) -> TransformersBackend:
    assert isinstance(tiny_backend, TransformersBackend)
    return tiny_backend


def _volume(tmp: Path, seed: int) -> list[np.ndarray]:
    from medlens.api import prepare_study
    from medlens.demo.phantom import ct_phantom, write_ct_series

    hu, _ = ct_phantom(n_slices=90, size=64, seed=seed)
    write_ct_series(hu, tmp)
    prepared = prepare_study(tmp)
    assert len(prepared.images) == 85
    return prepared.images


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return _volume(tmp_path_factory.mktemp("ct-a"), 0), _volume(tmp_path_factory.mktemp("ct-b"), 1)


class _CountingImageProcessor:
    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_eighteen_questions_on_one_volume(backend: TransformersBackend, volumes: tuple, monkeypatch) -> None:
    images, _ = volumes
    requests = [GenerationRequest(messages=volume_messages(images, _question(label))) for label in LABELS]
    independent = [backend.generate([request])[0] for request in requests]

    counter = _CountingImageProcessor(backend.processor.image_processor)
    monkeypatch.setattr(backend.processor, "image_processor", counter)
    calls: list[int] = []
    shared = backend.generate(requests, progress=calls.append)
    monkeypatch.undo()

    assert [_signature(o) for o in shared] == [_signature(o) for o in independent]
    assert counter.calls == 1 and calls == [1] * len(LABELS)
    prefix = shared[0].timings["prefix_tokens"]
    assert all(o.timings["prefix_reused"] == 1.0 and o.timings["prefix_tokens"] == prefix for o in shared)
    assert 85 * backend.model.config.mm_tokens_per_image < prefix < shared[0].prompt_tokens
    assert all("prefix_reused" not in o.timings for o in independent)
    # the questions do change the answers: test-tiny (greedy) writes 17 different texts to the 18 questions
    # (only "kidney stone" and "atelectasis" get the same one); answers that ignored the question (the shared
    # prefix alone) would be one text for all
    texts = [o.text for o in shared]
    assert all(texts) and len(set(texts)) >= len(LABELS) - 2


def test_sampling_with_seeds_is_the_same(backend: TransformersBackend, volumes: tuple) -> None:
    images, _ = volumes
    requests = [
        GenerationRequest(messages=volume_messages(images, _question(label)), temperature=1.0, seed=seed)
        for seed, label in enumerate(LABELS[:6])
    ]
    independent = [backend.generate([request])[0] for request in requests]
    shared = backend.generate(requests)
    assert [_signature(o) for o in shared] == [_signature(o) for o in independent]
    assert shared[0].timings["prefix_reused"] == 1.0


def test_mixed_batch_is_grouped_and_keeps_order(backend: TransformersBackend, volumes: tuple) -> None:
    a, b = volumes
    requests = [
        GenerationRequest(messages=volume_messages(a, _question("ascites"))),
        GenerationRequest(messages=volume_messages(b, _question("ascites"))),
        _text_request("What is a pleural effusion?"),
        GenerationRequest(messages=volume_messages([x.copy() for x in a], _question("free air"))),
        GenerationRequest(messages=volume_messages(b, _question("free air")), max_new_tokens=3),
        GenerationRequest(messages=volume_messages(a, _question("fracture"))),
    ]
    independent = [backend.generate([request])[0] for request in requests]
    shared = backend.generate(requests)
    assert [_signature(o) for o in shared] == [_signature(o) for o in independent]
    assert [o.timings.get("prefix_reused", 0.0) for o in shared] == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert shared[0].timings["prefix_tokens"] == shared[1].timings["prefix_tokens"]  # same layout, other pixels
    assert shared[0].prompt_tokens != shared[2].prompt_tokens
    assert shared[4].completion_tokens <= 3


def test_single_request_is_unchanged(backend: TransformersBackend, volumes: tuple) -> None:
    images, _ = volumes
    request = GenerationRequest(messages=volume_messages(images, _question("kidney stone")))
    (output,) = backend.generate([request])
    assert set(output.timings) == {"preprocess", "generate"}
    assert _signature(output) == _signature(backend.generate_one(request))


def test_switched_off(backend: TransformersBackend, volumes: tuple, monkeypatch) -> None:
    images, _ = volumes
    requests = [GenerationRequest(messages=volume_messages(images, _question(label))) for label in LABELS[:2]]
    monkeypatch.setattr(backend, "share_prefix", False)
    outputs = backend.generate(requests)
    assert all("prefix_reused" not in o.timings for o in outputs)  # no shared prefill
    assert all(o.timings["batch_size"] == 2 for o in outputs)  # the two requests ran as one padded batch


def test_hybrid_generation_config(backend: TransformersBackend, volumes: tuple, monkeypatch) -> None:
    """MedGemma's generation_config asks for the "hybrid" cache; both paths still run and agree."""
    images, _ = volumes
    monkeypatch.setattr(backend.model.generation_config, "cache_implementation", "hybrid")
    requests = [GenerationRequest(messages=volume_messages(images, _question(label))) for label in LABELS[:3]]
    independent = [backend.generate([request])[0] for request in requests]
    assert [_signature(o) for o in backend.generate(requests)] == [_signature(o) for o in independent]


def test_short_shared_text_goes_the_normal_way(backend: TransformersBackend) -> None:
    requests = [
        GenerationRequest(
            messages=[{"role": "user", "content": [{"type": "text", "text": "Hi."}, {"type": "text", "text": q}]}]
        )
        for q in ("Is the heart size normal?", "Is there a pneumothorax?")
    ]
    outputs = backend.generate(requests)
    assert all("prefix_reused" not in o.timings for o in outputs)  # a few shared tokens: not worth a prefill
    assert [_signature(o) for o in outputs] == [_signature(backend.generate_one(r)) for r in requests]
