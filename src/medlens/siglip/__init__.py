"""MedSigLIP: image and text embeddings, zero-shot classification, linear probes and a similar-case index.

Modules: ``encoder`` (embeddings and logits; the model is found through :mod:`medlens.models`),
``zeroshot``, ``probe``, ``index`` (the on-disk index, exact or through ``ann``: usearch's HNSW graph),
``inputs`` (studies and CSVs), ``embedding_file`` (the ``.npz`` of ``medlens embed``), ``embedding_shards``
(its Parquet folder), ``archive`` and ``archive_ray`` (a whole archive embedded here or on Ray). Importing
this package does not import torch, usearch, pyarrow or ray.
"""
