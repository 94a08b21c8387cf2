"""From examples to training batches: the prompt encoded exactly as the transformers backend encodes it for
generation (:meth:`TransformersBackend.prepare`: the model's chat template through
:func:`~medlens.backends.rendering.render_prompt`, the processor on the same PIL images), then the answer's
tokens and the end-of-turn token that stops generation.

Labels are ``-100`` (ignored by the loss) for every prompt token, every image token and all padding: only
the answer and its end-of-turn token are learned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medlens.backends.rendering import END_TOKENS
from medlens.errors import InputError, MedlensError
from medlens.finetune.examples import Example

#: the label value the loss ignores
IGNORE = -100
#: per-token inputs of a batch, right-padded with these values (``None``: the tokenizer's pad id)
_PADDED = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE}


@dataclass
class Encoded:
    """One example as model inputs (1-D tensors; ``pixel_values`` stacked images or None)."""

    id: str
    input_ids: Any
    labels: Any
    extra: dict[str, Any] = field(default_factory=dict)
    pixel_values: Any = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


class ExampleEncoder:
    """Encodes examples with a loaded transformers backend (its processor or tokenizer, its chat template)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.tokenizer = backend.tokenizer
        vocab = self.tokenizer.get_vocab()
        #: the token that ends an answer at generation time (Gemma: ``<end_of_turn>``)
        self.end_token = next((t for t in reversed(END_TOKENS) if t in vocab), self.tokenizer.eos_token)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else vocab[self.end_token])
        self.masked_ids = image_token_ids(backend)

    def encode(self, example: Example) -> Encoded:
        """The example's prompt (as generation sees it) followed by its answer; labels on the answer only."""
        import torch

        try:
            inputs = self.backend.prepare(example.messages())
        except MedlensError as exc:
            raise InputError(f"training example {example.id!r}: {exc.reason}", exc.path) from None
        prompt = inputs["input_ids"][0]
        answer = self.answer_ids(example.answer).to(prompt.device)
        input_ids = torch.cat([prompt, answer])
        labels = torch.cat([torch.full_like(prompt, IGNORE), answer])
        for token in self.masked_ids:
            labels[input_ids == token] = IGNORE
        extra = {"attention_mask": torch.ones_like(input_ids)}
        if "token_type_ids" in inputs:
            extra["token_type_ids"] = torch.cat([inputs["token_type_ids"][0], torch.zeros_like(answer)])
        return Encoded(example.id, input_ids, labels, extra, inputs.get("pixel_values"))

    def answer_ids(self, answer: str) -> Any:
        """The answer's token ids, ending with the end-of-turn token."""
        text = answer.strip() + self.end_token
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]


def image_token_ids(backend: Any) -> set[int]:
    """Ids of the tokens that stand for images (image soft tokens, begin/end of image); none for a text model."""
    ids: set[int] = set()
    config = getattr(backend.model, "config", None)
    for name in ("image_token_id", "image_token_index", "boi_token_index", "eoi_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            ids.add(value)
    processor = getattr(backend, "processor", None)
    vocab = backend.tokenizer.get_vocab()
    for name in ("image_token", "boi_token", "eoi_token"):
        token = getattr(processor, name, None) if processor is not None else None
        if isinstance(token, str) and token in vocab:
            ids.add(vocab[token])
    return ids


class Collator:
    """The trainer's ``data_collator``: dataset rows carry an example index; the example is prepared and
    encoded here (on use), and the batch right-padded. ``seen`` keeps the ids of every batch made, in order,
    and ``tokens`` the number of real (unpadded) tokens, for the training log."""

    def __init__(self, encoder: ExampleEncoder, examples: list[Example]) -> None:
        self.encoder = encoder
        self.examples = examples
        self.seen: list[list[str]] = []
        self.tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        encoded = [self.encoder.encode(self.examples[int(f["index"])]) for f in features]
        self.seen.append([e.id for e in encoded])
        self.tokens += sum(e.length for e in encoded)
        return pad_batch(encoded, self.encoder.pad_id)


def pad_batch(encoded: list[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-pad the examples into one batch; images concatenated in example order."""
    import torch

    width = max(e.length for e in encoded)
    batch: dict[str, Any] = {}
    keys = ["input_ids", "labels", *[k for k in _PADDED if all(k in e.extra for e in encoded)]]
    for key in dict.fromkeys(keys):
        value = _PADDED[key]
        pad = pad_id if value is None else value
        rows = []
        for e in encoded:
            row = getattr(e, key) if key in ("input_ids", "labels") else e.extra[key]
            rows.append(torch.nn.functional.pad(row, (0, width - row.shape[0]), value=pad))
        batch[key] = torch.stack(rows)
    images = [e.pixel_values for e in encoded if e.pixel_values is not None]
    if images:
        batch["pixel_values"] = torch.cat(images)
    return batch


__all__ = ["IGNORE", "Collator", "Encoded", "ExampleEncoder", "image_token_ids", "pad_batch"]
