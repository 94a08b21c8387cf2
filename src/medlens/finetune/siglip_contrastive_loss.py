"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023) over pooled study embeddings.

Written here rather than taken from ``SiglipModel(..., return_loss=True)`` for two measured reasons:
that loss needs one image per text (a CT row has up to 85 slices, pooled here as ``medlens embed`` pools a
study: mean of the unit image embeddings, re-normalised), and it counts only the diagonal as positive, so two
rows of a batch with the same text (common when texts are class descriptions) would be pushed apart. With one
image per row and distinct texts the two losses are equal (checked in the tests).
"""

from __future__ import annotations

from typing import Any


def pool_rows(image_embeddings: Any, counts: list[int]) -> Any:
    """``(sum(counts), d)`` image features -> ``(len(counts), d)`` unit vectors: the mean of each row's unit
    image embeddings, scaled back to unit length."""
    import torch

    unit = torch.nn.functional.normalize(image_embeddings, dim=-1)
    rows = torch.repeat_interleave(
        torch.arange(len(counts), device=unit.device), torch.tensor(counts, device=unit.device)
    )
    summed = torch.zeros(len(counts), unit.shape[-1], dtype=unit.dtype, device=unit.device).index_add(0, rows, unit)
    return torch.nn.functional.normalize(summed, dim=-1)


def sigmoid_loss(image_rows: Any, text_rows: Any, logit_scale: Any, logit_bias: Any, positives: Any) -> Any:
    """Mean over texts of ``-sum_j log sigmoid(z_ij * (exp(t) * cos_ij + b))``, ``z = +1`` on positive
    pairs (``positives``, ``(n_texts, n_rows)`` bool) and ``-1`` elsewhere; ``t`` and ``b`` are the model's
    learnable temperature and bias. Inputs are unit vectors."""
    import torch

    logits = text_rows @ image_rows.t() * logit_scale.exp() + logit_bias
    signs = positives.to(logits.dtype) * 2 - 1
    return -torch.nn.functional.logsigmoid(signs * logits).sum(dim=-1).mean()
