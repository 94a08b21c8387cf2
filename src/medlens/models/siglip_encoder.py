"""MedSigLIP image and text embeddings, and SigLIP's image-text logits (the models layer, so every consumer
can embed: siglip, finetune, overlap checks).

Pixels come from :func:`medlens.prep.siglip.medsiglip_pixels` (bilinear without antialias, [-1, 1], at the
vision tower's ``image_size``), never from the Hugging Face image processor. Texts are tokenised to exactly
64 tokens with ``padding="max_length"``: SigLIP's text tower pools the LAST position, so shorter padding
gives other embeddings than the published ones. torch and transformers are imported when a model loads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medlens.errors import ModelNotAvailableError
from medlens.models.builtins import EMBED
from medlens.models.device import select_device, select_dtype
from medlens.models.fingerprint import model_fingerprint
from medlens.models.hf import hushed_warnings, import_torch_transformers, loader_errors, progress_bars
from medlens.models.resolve import DOWNLOAD_HINTS, resolve_model
from medlens.prep.siglip import medsiglip_pixels

#: MedSigLIP's text length; every text is padded (or truncated) to it
TEXT_TOKENS = 64

Progress = Callable[[int, int], None]


def normalize_rows(values: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    values = np.asarray(values, dtype=np.float32)
    norms = np.linalg.norm(values, axis=-1, keepdims=True)
    return (values / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def pooled_output(output: Any) -> Any:
    """``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    return output if hasattr(output, "ndim") else output.pooler_output


class SiglipEncoder:
    """A loaded SigLIP model (MedSigLIP or ``test-tiny-siglip``) that embeds images and texts."""

    def __init__(
        self,
        model: str = "test-tiny-siglip",
        device: str = "auto",
        dtype: str = "auto",
        attn_implementation: str | None = None,
    ) -> None:
        torch, transformers = import_torch_transformers("MedSigLIP")
        self._torch = torch
        self.device = select_device(torch, device)
        self.dtype = select_dtype(torch, dtype, self.device)
        source = resolve_model(model, EMBED)
        self.name = source.name
        self.directory = source.path
        self.is_test_model = source.is_test_model
        self.warning = source.warning
        self.fingerprint = model_fingerprint(source.path)
        with progress_bars(False), hushed_warnings(), loader_errors(model, DOWNLOAD_HINTS[EMBED]):
            options = {"attn_implementation": attn_implementation} if attn_implementation else {}
            self.model = transformers.SiglipModel.from_pretrained(
                source.path, dtype=self.dtype, local_files_only=True, **options
            )
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(source.path, local_files_only=True)
        self.model.to(self.device).eval()
        config = self.model.config
        self.image_size = int(config.vision_config.image_size)
        self.dim = int(config.vision_config.hidden_size)
        text_dim = int(getattr(config.text_config, "projection_size", None) or config.text_config.hidden_size)
        if text_dim != self.dim:
            raise ModelNotAvailableError(
                f"text embeddings ({text_dim}) and image embeddings ({self.dim}) differ in size", str(source.path)
            )
        positions = int(config.text_config.max_position_embeddings)
        if positions < TEXT_TOKENS:
            raise ModelNotAvailableError(
                f"the text tower takes {positions} positions, fewer than MedSigLIP's {TEXT_TOKENS}",
                str(source.path),
            )
        self.logit_scale = float(self.model.logit_scale.detach().float().exp().item())
        self.logit_bias = float(self.model.logit_bias.detach().float().item())

    def info(self) -> dict[str, Any]:
        """What a result should record about the model."""
        return {
            "model": self.name,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "image_size": self.image_size,
            "untrained_test_model": self.is_test_model,
        }

    def pixels(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 images -> ``(n, 3, S, S)`` float32 in [-1, 1] at the vision tower's size."""
        if not images:
            return np.zeros((0, 3, self.image_size, self.image_size), np.float32)
        return np.stack([medsiglip_pixels(image, self.image_size) for image in images])

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids (and the attention mask when the tokenizer gives one), exactly 64 per text."""
        encoded = self.tokenizer(
            list(texts), padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="np"
        )
        return {k: np.asarray(v) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}

    def embed_images(
        self, images: Sequence[np.ndarray], batch_size: int = 8, progress: Progress | None = None
    ) -> np.ndarray:
        """``(n, dim)`` L2-normalised float32 image embeddings."""
        torch = self._torch
        out = [np.zeros((0, self.dim), np.float32)]
        with torch.inference_mode():
            for start in range(0, len(images), max(1, batch_size)):
                batch = self.pixels(images[start : start + batch_size])
                tensor = torch.from_numpy(batch).to(self.device, self.dtype)
                features = pooled_output(self.model.get_image_features(pixel_values=tensor))
                out.append(features.float().cpu().numpy())
                if progress is not None:
                    progress(min(start + batch_size, len(images)), len(images))
        return normalize_rows(np.concatenate(out))

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``(n, dim)`` L2-normalised float32 text embeddings."""
        torch = self._torch
        out = [np.zeros((0, self.dim), np.float32)]
        with torch.inference_mode():
            for start in range(0, len(texts), max(1, batch_size)):
                tokens = self.tokenize(texts[start : start + batch_size])
                inputs = {k: torch.from_numpy(v).to(self.device) for k, v in tokens.items()}
                out.append(pooled_output(self.model.get_text_features(**inputs)).float().cpu().numpy())
        return normalize_rows(np.concatenate(out))

    def logits(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        """SigLIP logits ``exp(logit_scale) * cos + logit_bias``, ``(n_images, n_texts)``."""
        cos = normalize_rows(np.atleast_2d(image_embeddings)) @ normalize_rows(np.atleast_2d(text_embeddings)).T
        return (self.logit_scale * cos + self.logit_bias).astype(np.float32)

    def close(self) -> None:
        """Free the model (and the GPU memory it holds)."""
        self.model = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()
