"""Defaults of the leakage guard (``docs/overlap.md`` gives the measurements behind them); no heavy imports, so
the command line can show them."""

from __future__ import annotations

#: Hamming distance (of 64 bits) up to which two perceptual hashes are near duplicates: resized, re-encoded
#: and slightly cropped copies measured at 0-10 bits, unrelated images at 16 bits or more
IMAGE_HASH_DISTANCE = 10
#: cosine of MedSigLIP image embeddings from which two images are near duplicates (not measured on the real
#: MedSigLIP weights here: tune it on your data)
SIGLIP_THRESHOLD = 0.95
#: words per n-gram of the text check (13, as in the common decontamination checks of language-model benchmarks)
NGRAM = 13
#: a text key found in more training rows than this, or than this share of them, is boilerplate
COMMON_MIN_ROWS = 5
COMMON_SHARE = 0.02
