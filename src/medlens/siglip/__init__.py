"""MedSigLIP: image and text embeddings, zero-shot classification, linear probes and a similar-case index.

Modules: ``models`` (which model a name means), ``tiny`` (the built-in ``test-tiny-siglip``), ``encoder``
(embeddings and logits), ``zeroshot``, ``probe``, ``index``, ``inputs`` (studies and CSVs) and
``embedding_file`` (the ``.npz`` of ``medlens embed``). Importing this package does not import torch.
"""

from __future__ import annotations

from medlens.siglip.models import SIGLIP_MODELS, resolve_siglip

__all__ = ["SIGLIP_MODELS", "resolve_siglip"]
