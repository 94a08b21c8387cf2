"""Embedding a whole archive into a Parquet folder (:mod:`.embedding_shards`): the per-study preparation (CPU:
read, window, sample, resize to the encoder's pixels) and the per-batch embedding (the model), run here in
this process (:func:`embed_local`) or on a Ray cluster (:func:`medlens.siglip.archive_ray.embed_ray`), with
the same functions, so both give the same rows. A study that cannot be read fails alone: its error goes to
``errors.jsonl`` and the run goes on."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import InputError
from medlens.files import sha256_of
from medlens.pipeline.failures import describe
from medlens.prep import prepare_study
from medlens.prep.siglip import medsiglip_pixels
from medlens.progress import Reporter
from medlens.siglip.embedding_shards import ShardWriter
from medlens.siglip.encoder import SiglipEncoder, normalize_rows
from medlens.siglip.inputs import InputRef

#: the columns a prepared image row carries besides its pixels
ROW_FIELDS = ("row", "path", "image", "label", "input_sha256", "error", "warnings")


def input_rows(refs: Sequence[InputRef]) -> list[dict[str, Any]]:
    """One row per study: its place among the inputs, its absolute path (workers have their own working
    folder) and its label ("" for none)."""
    return [{"row": i, "path": str(ref.path.resolve()), "label": ref.label or ""} for i, ref in enumerate(refs)]


@dataclass(frozen=True)
class PrepareStudy:
    """Read one study and turn its images into the encoder's pixels: one output row per image, or a single
    row carrying the error (``error``: the error record as JSON; zero pixels). Picklable (Ray tasks)."""

    image_size: int
    recipe: str
    series: str | None = None
    modality: str | None = None

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        path = str(row["path"])
        base = {"row": int(row["row"]), "path": path, "label": str(row["label"])}
        try:
            prepared = prepare_study(Path(path), recipe=self.recipe, series=self.series, modality=self.modality)
            if not prepared.images:
                raise InputError("no images to embed", path)
            digest = sha256_of(path)
            warnings = json.dumps(list(prepared.warnings))
            return [
                {
                    **base,
                    "image": number,
                    "input_sha256": digest,
                    "pixels": medsiglip_pixels(image, self.image_size),
                    "error": "",
                    "warnings": warnings if number == 1 else "[]",
                }
                for number, image in enumerate(prepared.images, start=1)
            ]
        except Exception as exc:  # one bad study fails only its row
            record = {**describe(exc, "prepare"), "path": path}
            return [
                {
                    **base,
                    "image": 0,
                    "input_sha256": "",
                    "pixels": np.zeros((3, self.image_size, self.image_size), np.float32),
                    "error": json.dumps(record),
                    "warnings": "[]",
                }
            ]


def embed_pixels(encoder: SiglipEncoder, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """``(n, dim)`` unit embeddings of prepared ``(n, 3, S, S)`` pixels (what ``embed_images`` does after
    :meth:`SiglipEncoder.pixels`)."""
    import torch

    from medlens.models.siglip_encoder import pooled_output

    out = [np.zeros((0, encoder.dim), np.float32)]
    with torch.inference_mode():
        for start in range(0, len(pixels), max(1, batch_size)):
            chunk = np.ascontiguousarray(pixels[start : start + batch_size], dtype=np.float32)
            tensor = torch.from_numpy(chunk).to(encoder.device, encoder.dtype)
            out.append(pooled_output(encoder.model.get_image_features(pixel_values=tensor)).float().cpu().numpy())
    return normalize_rows(np.concatenate(out))


@dataclass(frozen=True)
class EncoderSpec:
    """How to load the encoder where it runs (here, or once per Ray actor): picklable."""

    model: str
    device: str = "auto"
    dtype: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)

    def load(self) -> SiglipEncoder:
        return SiglipEncoder(self.model, device=self.device, dtype=self.dtype, **self.options)


class EmbedBatch:
    """A batch of prepared rows -> the same rows with ``vector`` (zeros for error rows) and the encoder's
    ``fingerprint``, pixels dropped. On Ray one instance per actor: the encoder loads once."""

    def __init__(self, spec: EncoderSpec, batch_size: int) -> None:
        self.encoder = spec.load()
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["error"]) == ""
        vectors = np.zeros((len(ok), self.encoder.dim), np.float32)
        if ok.any():
            vectors[ok] = embed_pixels(self.encoder, np.asarray(batch["pixels"])[ok], self.batch_size)
        out = {name: np.asarray(batch[name]) for name in ROW_FIELDS}
        out["vector"] = vectors
        out["fingerprint"] = np.full(len(ok), self.encoder.fingerprint)
        return out


@dataclass
class Collector:
    """Hands embedded rows to the writer (errors to its errors list) and gathers the studies' warnings."""

    writer: ShardWriter
    warnings: list[str] = field(default_factory=list)
    studies_done: set[int] = field(default_factory=set)

    def take(self, batch: dict[str, np.ndarray]) -> None:
        for i in range(len(batch["row"])):
            row = int(batch["row"][i])
            self.studies_done.add(row)
            if batch["error"][i]:
                self.writer.error({"row": row, **json.loads(str(batch["error"][i]))})
                continue
            fingerprint = str(batch["fingerprint"][i])
            if fingerprint != self.writer.fingerprint:
                raise InputError(
                    f"a worker loaded other weights (fingerprint {fingerprint}, expected {self.writer.fingerprint}); "
                    "every node needs the same model files",
                    self.writer.model,
                )
            label = str(batch["label"][i]) or None
            self.writer.add(
                row,
                str(batch["path"][i]),
                int(batch["image"][i]),
                label,
                str(batch["input_sha256"][i]),
                batch["vector"][i],
            )
            self.warnings.extend(w for w in json.loads(str(batch["warnings"][i])) if w not in self.warnings)


def stack_rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows of :class:`PrepareStudy` as a column batch (what Ray Data gives ``map_batches``)."""
    batch = {name: np.asarray([r[name] for r in rows]) for name in ROW_FIELDS}
    batch["pixels"] = np.stack([r["pixels"] for r in rows])
    return batch


def embed_local(
    rows: list[dict[str, Any]],
    prepare: PrepareStudy,
    spec: EncoderSpec,
    collector: Collector,
    batch_size: int,
    reporter: Reporter | None = None,
) -> None:
    """Every study in this process, one at a time (memory: one study's pixels)."""
    reporter = reporter or Reporter(False)
    embed: EmbedBatch | None = None
    with reporter.stage("Embedding studies", total=len(rows)) as update:
        for done, row in enumerate(rows, start=1):
            prepared = prepare(row)
            if embed is None and prepared[0]["error"] == "":
                embed = EmbedBatch(spec, batch_size)
            batch = stack_rows(prepared)
            if embed is not None:
                collector.take(embed(batch))
            else:  # nothing embedded yet: the row is an error, no model needed
                collector.take({**batch, "vector": np.zeros((1, 0)), "fingerprint": np.array([""])})
            update(done, len(rows))


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to know of the encoder without loading its weights."""

    name: str
    fingerprint: str
    dim: int
    image_size: int
    warning: str | None = None


#: SigLIP's vision-tower defaults (transformers' ``SiglipVisionConfig``), for a config.json that omits them
VISION_DEFAULTS = {"hidden_size": 768, "image_size": 224}


def model_info(spec: EncoderSpec) -> ModelInfo:
    """Name, fingerprint, embedding size and input size of ``spec``'s model, from its folder's config.json
    (no weights loaded: the driver of a Ray run needs no model)."""
    from medlens.errors import ModelNotAvailableError
    from medlens.models.builtins import EMBED
    from medlens.models.fingerprint import model_fingerprint
    from medlens.models.resolve import resolve_model

    source = resolve_model(spec.model, EMBED)
    config_path = source.path / "config.json"
    try:
        vision = {**VISION_DEFAULTS, **(json.loads(config_path.read_text()).get("vision_config") or {})}
        dim, image_size = int(vision["hidden_size"]), int(vision["image_size"])
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ModelNotAvailableError(f"unreadable SigLIP config ({exc})", str(config_path)) from None
    return ModelInfo(source.name, model_fingerprint(source.path), dim, image_size, source.warning)
