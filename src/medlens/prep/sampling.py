"""Which slices of a volume the model sees, and in which order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from medlens.io.types import ImageStack
from medlens.registry import Registry

#: 85 slices x 256 tokens = 21,760 image tokens, MedGemma 1.5's limit per query (docs/recipe.md, Slices)
MEDGEMMA_MAX_SLICES = 85


def sample_indices(n_slices: int, max_slices: int = MEDGEMMA_MAX_SLICES) -> list[int]:
    """All indices when ``n_slices <= max_slices``; else ``max_slices`` equidistant indices along the stack,
    the first and last slice included, in increasing (geometric) order and without repeats."""
    if n_slices < 1 or max_slices < 1:
        raise ValueError("need at least one slice")
    if n_slices <= max_slices:
        return list(range(n_slices))
    if max_slices == 1:
        return [n_slices // 2]
    return [int(i) for i in np.rint(np.linspace(0, n_slices - 1, max_slices))]


def notebook_indices(n_slices: int, max_slices: int = MEDGEMMA_MAX_SLICES) -> list[int]:
    """The official CT notebook's sampler: all indices when ``n_slices <= max_slices``; else
    ``int(round(i / max_slices * (n_slices - 1)))`` for i = 1..max_slices (Python's round, half to even),
    which never picks the first slice and always picks the last."""
    if n_slices < 1 or max_slices < 1:
        raise ValueError("need at least one slice")
    if n_slices <= max_slices:
        return list(range(n_slices))
    return [round(i / max_slices * (n_slices - 1)) for i in range(1, max_slices + 1)]


# ---------------------------------------------------------------- slice order

#: (stack) -> the permutation of its slice indices a recipe feeds in (index k of the result = old index)
OrderFn = Callable[[ImageStack], list[int]]


def geometric_order(stack: ImageStack) -> list[int]:
    """The reader's order: slices along the normal, inferior to superior (docs/recipe.md, Reading)."""
    return list(range(len(stack)))


def instance_number_order(stack: ImageStack) -> list[int]:
    """Ascending InstanceNumber, as the official CT notebook sorts. Ties keep the geometric order; slices
    without an InstanceNumber (NIfTI, images) come after the numbered ones, in geometric order."""
    refs = stack.slices
    return sorted(
        range(len(refs)),
        key=lambda i: (refs[i].instance_number is None, refs[i].instance_number or 0, i),
    )


def file_order(stack: ImageStack) -> list[int]:
    """Sorted file path, then frame: the order a folder's files are listed in, which is what the HAI-DEF
    container keeps (it processes instances in the order it is given them)."""
    refs = stack.slices
    return sorted(range(len(refs)), key=lambda i: (refs[i].file, refs[i].frame or 0, i))


ORDERS: Registry[OrderFn] = Registry("slice order")
ORDERS.add("geometric", geometric_order)
ORDERS.add("instance_number", instance_number_order)
ORDERS.add("files", file_order)


def reorder(stack: ImageStack, order: str) -> ImageStack:
    """``stack`` with its slices in the order named ``order`` (the same object when nothing moves)."""
    perm = ORDERS.get(order)(stack)
    if perm == list(range(len(stack))):
        return stack
    loader = stack.loader

    def load(indices: Sequence[int]) -> np.ndarray:
        return loader([perm[i] for i in indices])

    fetch = stack.prefetch
    prefetch = None if fetch is None else lambda indices: fetch([perm[i] for i in indices])
    return replace(stack, slices=[stack.slices[i] for i in perm], loader=load, prefetch=prefetch)
