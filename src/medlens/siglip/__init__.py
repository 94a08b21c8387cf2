"""MedSigLIP: image and text embeddings, zero-shot classification, linear probes and a similar-case index.

Modules: ``encoder`` (embeddings and logits; the model is found through :mod:`medlens.models`),
``zeroshot``, ``probe``, ``index``, ``inputs`` (studies and CSVs) and ``embedding_file`` (the ``.npz`` of
``medlens embed``). Importing this package does not import torch.
"""
