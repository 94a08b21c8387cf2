"""Batched greedy generation on ``test-tiny``: left-padded batches give the answers of one request at a time."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from medlens.backends import GenerationOutput, GenerationRequest, load_backend
from medlens.backends.transformers_backend import TransformersBackend
from medlens.errors import MedlensError


@pytest.fixture
def backend(tiny_backend) -> Iterator[TransformersBackend]:
    assert isinstance(tiny_backend, TransformersBackend)
    settings = tiny_backend.batch_size, tiny_backend.tie_margin, tiny_backend.share_prefix
    yield tiny_backend
    tiny_backend.batch_size, tiny_backend.tie_margin, tiny_backend.share_prefix = settings


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _request(text: str, images: tuple[np.ndarray, ...] = (), **options: object) -> GenerationRequest:
    content = [*({"type": "image", "image": image} for image in images), {"type": "text", "text": text}]
    return GenerationRequest(messages=[{"role": "user", "content": content}], **options)  # type: ignore[arg-type]


def _signature(output: GenerationOutput) -> tuple[str, int, int, str]:
    return output.text, output.prompt_tokens, output.completion_tokens, output.finish_reason


#: a prompt longer than test-tiny's 64-token sliding window
LONG = (
    "Summarise the report. The lungs are clear. There is a small left pleural effusion with adjacent "
    "atelectasis of the left lower lobe. The heart size is normal. No pneumothorax. A 5 mm nodule in the "
    "right upper lobe. Consolidation in the right lower lobe consistent with pneumonia."
)


def _mixed() -> list[GenerationRequest]:
    """Text-only prompts of different lengths, one image, two images of different sizes, small caps, and a
    prompt longer than the sliding window (so that short rows carry more padding than the window)."""
    return [
        _request("no", max_new_tokens=40),  # test-tiny ends this one with <end_of_turn> as its 35th token
        _request("Describe the chest radiograph. Is there a pleural effusion on the left or on the right side?"),
        _request("Describe the image.", (_image(32, 48, 1),)),
        _request("Is there a pneumothorax?", (_image(200, 300, 10), _image(64, 40, 11)), max_new_tokens=24),
        _request("What is a pleural effusion?", max_new_tokens=3),
        _request("Which organ is abnormal?", (_image(90, 90, 12),), max_new_tokens=1),
        _request("The lungs are clear."),
        _request(LONG, (_image(50, 70, 13),), max_new_tokens=8),  # its prompt alone exceeds the sliding window
    ]


def _alone(backend: TransformersBackend, requests: list[GenerationRequest]) -> list[GenerationOutput]:
    return [backend.generate_one(request) for request in requests]


@pytest.fixture(scope="module")
def mixed_alone(tiny_backend) -> list[tuple[str, int, int, str]]:
    """The answers to :func:`_mixed`, one request at a time (``generate_one``), computed once."""
    return [_signature(o) for o in _alone(tiny_backend, _mixed())]


def test_mixed_batch_equals_one_at_a_time(backend: TransformersBackend, mixed_alone: list) -> None:
    assert [s[3] for s in mixed_alone] == ["stop"] + ["length"] * 7
    assert [s[2] for s in mixed_alone] == [35, 16, 16, 24, 3, 1, 16, 8]
    requests = _mixed()
    backend.batch_size = len(requests)
    batched = backend.generate(requests)
    assert [_signature(o) for o in batched] == mixed_alone
    # one batch, no row recomputed alone: the answers above came from the padded batch itself
    assert all(o.timings["batch_size"] == len(requests) and "tie_rerun" not in o.timings for o in batched)
    assert len({o.prompt_tokens for o in batched}) == len(requests)  # every row needed its own padding
    assert {"preprocess", "generate"} <= set(batched[0].timings)


def test_batches_of_other_sizes_agree(backend: TransformersBackend, mixed_alone: list) -> None:
    requests = _mixed() * 2  # the same prompts twice: batches mix lengths and image counts differently
    backend.share_prefix = False  # copies of one image request would share their prefix instead
    for size in (2, 5):
        backend.batch_size = size
        outputs = backend.generate(requests)
        assert [_signature(o) for o in outputs] == mixed_alone * 2, size
        assert not any("tie_rerun" in o.timings for o in outputs)
        sizes = [int(o.timings["batch_size"]) for o in outputs]
        assert max(sizes) <= size and max(sizes) - min(sizes) <= 1  # batches of even sizes


def test_batch_size_one_is_the_old_path(backend: TransformersBackend, mixed_alone: list) -> None:
    backend.batch_size = 1
    outputs = backend.generate(_mixed())
    assert all(set(o.timings) == {"preprocess", "generate"} for o in outputs)
    assert [_signature(o) for o in outputs] == mixed_alone


def test_order_progress_and_timings(backend: TransformersBackend) -> None:
    # four different answers; the batch runs them sorted by length, the outputs keep the input order
    image = _image(32, 48, 1)
    requests = [_request("x " * 30), _request("no"), _request("Describe the image.", (image,)), _request("a")]
    alone = _alone(backend, requests)
    assert len({o.text for o in alone}) == 4
    calls: list[int] = []
    backend.batch_size = 4
    outputs = backend.generate(requests, progress=calls.append)
    assert calls == [1, 1, 1, 1]
    assert [_signature(o) for o in outputs] == [_signature(o) for o in alone]
    assert all(set(o.timings) == {"preprocess", "generate", "batch_size"} for o in outputs)
    # the batch's seconds, spread evenly over its rows
    assert len({o.timings["generate"] for o in outputs}) == len({o.timings["preprocess"] for o in outputs}) == 1


def test_sampled_requests_run_alone_and_seeded(backend: TransformersBackend) -> None:
    requests = [
        _request("Describe the image.", (_image(32, 48, 1),), temperature=1.0, seed=7),
        _request("Describe the image.", (_image(32, 48, 2),)),
        _request("What is a pleural effusion?", temperature=1.0, seed=3),
        _request("no"),
    ]
    alone = _alone(backend, requests)
    outputs = backend.generate(requests)
    assert [_signature(o) for o in outputs] == [_signature(o) for o in alone]
    assert ["batch_size" in o.timings for o in outputs] == [False, True, False, True]


def test_prefix_groups_keep_their_path(backend: TransformersBackend) -> None:
    slices = [_image(64, 64, seed) for seed in range(5)]
    instruction = "You are shown the slices of a CT volume, in order, one image per slice. Read them carefully."

    def volume(question: str) -> GenerationRequest:
        content: list[dict] = [{"type": "text", "text": instruction}]
        for n, image in enumerate(slices, 1):
            content += [{"type": "image", "image": image}, {"type": "text", "text": f"SLICE {n}"}]
        return GenerationRequest(messages=[{"role": "user", "content": [*content, {"type": "text", "text": question}]}])

    requests = [volume("Is there ascites?"), *_mixed()[:3], volume("Is there free air?"), _mixed()[4]]
    alone = _alone(backend, requests)
    outputs = backend.generate(requests)
    assert [_signature(o) for o in outputs] == [_signature(o) for o in alone]
    assert [o.timings.get("prefix_reused", 0.0) for o in outputs] == [1.0, 0, 0, 0, 1.0, 0]
    assert [o.timings.get("batch_size", 0.0) for o in outputs] == [0, 4.0, 4.0, 4.0, 0, 4.0]


def test_near_ties_are_recomputed_alone(backend: TransformersBackend, mixed_alone: list) -> None:
    backend.tie_margin = 1.0  # every step counts as a near tie
    outputs = backend.generate(_mixed()[:4])
    assert [_signature(o) for o in outputs] == mixed_alone[:4]
    assert all(o.timings["tie_rerun"] == 1.0 and o.timings["batch_size"] == 4 for o in outputs)


def test_batch_size_is_a_model_arg(mixed_alone: list) -> None:
    loaded = load_backend("test-tiny", batch_size=4)
    try:
        assert isinstance(loaded, TransformersBackend) and loaded.batch_size == 4
        assert loaded.tie_margin == 1e-4  # float32 on the CPU
        outputs = loaded.generate(_mixed()[:5])
        assert sorted(int(o.timings["batch_size"]) for o in outputs) == [2, 2, 3, 3, 3]  # 5 = 3 + 2, not 4 + 1
        assert [_signature(o) for o in outputs] == mixed_alone[:5]
    finally:
        loaded.close()
    for wrong in ({"batch_size": 0}, {"batch_size": 2.5}, {"tie_margin": -1}):
        with pytest.raises(MedlensError, match=r"batch_size|tie_margin"):
            load_backend("test-tiny", **wrong)
    with pytest.raises(MedlensError, match="did you mean 'batch_size'"):
        load_backend("test-tiny", batchsize=4)
