"""Finding requests that share a prefix, so that an engine can encode the images and prefill it once.

A benchmark that asks N conditions about one CT volume sends N requests that differ only in the question,
which the volume layout puts last (see ``medlens.prompts.layouts``). Two requests share a prefix when
their messages are equal except for the text of the last part of the last (user) message: same roles,
same text parts, and image parts with the same pixels (compared by a content hash, so two copies of one
array match). Pure Python and numpy; no torch here.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from medlens.chat import Messages


def group_by_prefix(batch: Sequence[Messages]) -> list[list[int]]:
    """Indices of ``batch`` grouped by shared prefix, groups in order of first appearance (members in input
    order). A request without a trailing question, or with nothing before it, is a group of its own."""
    digests: dict[int, bytes] = {}  # id(image) -> content hash, so one array is hashed once per batch
    groups: list[list[int]] = []
    by_key: dict[str, list[int]] = {}
    for index, messages in enumerate(batch):
        key = prefix_key(messages, digests)
        if key is None:
            groups.append([index])
        elif key in by_key:
            by_key[key].append(index)
        else:
            by_key[key] = [index]
            groups.append(by_key[key])
    return groups


def prefix_key(messages: Messages, digests: dict[int, bytes] | None = None) -> str | None:
    """A digest of everything but the trailing question text; ``None`` when there is no such split."""
    if not messages or messages[-1].get("role") != "user":
        return None
    last = messages[-1].get("content")
    if not isinstance(last, list) or not _is_text(last[-1]):
        return None
    digests = {} if digests is None else digests
    digest = hashlib.sha256()
    n_parts = 0
    for position, message in enumerate(messages):
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": str(content)}]
        if position == len(messages) - 1:
            parts = parts[:-1]
        digest.update(b"\x00role:" + str(message.get("role")).encode())
        for part in parts:
            if _is_text(part):
                text = part["text"].encode()
                digest.update(b"\x00text:%d:" % len(text) + text)
            elif isinstance(part, dict) and part.get("type") == "image" and part.get("image") is not None:
                digest.update(b"\x00image:" + image_digest(part["image"], digests))
            else:
                return None  # a part we cannot compare
            n_parts += 1
    return digest.hexdigest() if n_parts else None


def image_digest(image: Any, digests: dict[int, bytes] | None = None) -> bytes:
    """SHA-256 of an image's pixels, shape and dtype (an array, or a PIL image via its pixel array)."""
    if digests is not None and id(image) in digests:
        return digests[id(image)]
    array = np.ascontiguousarray(np.asarray(image))
    digest = hashlib.sha256(f"{array.shape}|{array.dtype.str}|".encode())
    digest.update(memoryview(array).cast("B"))
    if digests is not None:
        digests[id(image)] = digest.digest()
    return digest.digest()


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix all ``sequences`` share."""
    if not sequences:
        return 0
    first, length = sequences[0], min(len(s) for s in sequences)
    for other in sequences[1:]:
        length = next((i for i in range(length) if other[i] != first[i]), length)
    return length


@contextlib.contextmanager
def images_processed_once(processor: Any) -> Iterator[None]:
    """While active, ``processor``'s image processor runs once and replays its result when it is called again
    with the same image objects and options, so every request of a group gets its exact token ids from the
    processor's own text handling while the images are resized and normalised once."""
    inner = getattr(processor, "image_processor", None)
    if inner is None:
        yield
        return
    processor.image_processor = _ReplayingImageProcessor(inner)
    try:
        yield
    finally:
        processor.image_processor = inner


class _ReplayingImageProcessor:
    """Wraps an image processor; every attribute but the call goes to the wrapped one."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._seen: tuple[list[int], dict[str, Any]] | None = None
        self._result: Any = None
        self._keep: Any = None  # the images last seen: their ids stay valid while they are alive

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, images: Any, **kwargs: Any) -> Any:
        seen = ([id(image) for image in _flatten(images)], kwargs)
        if self._seen is None or not _same_call(self._seen, seen):
            self._result = self._inner(images, **kwargs)
            self._seen = seen
            self._keep = images
        return self._result


def _same_call(a: tuple[list[int], dict[str, Any]], b: tuple[list[int], dict[str, Any]]) -> bool:
    try:
        return (
            a[0] == b[0] and a[1].keys() == b[1].keys() and all(a[1][k] is b[1][k] or a[1][k] == b[1][k] for k in a[1])
        )
    except (TypeError, ValueError):  # options that do not compare (arrays): run again
        return False


def _flatten(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return [leaf for item in images for leaf in _flatten(item)]
    return [images]


def _is_text(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
