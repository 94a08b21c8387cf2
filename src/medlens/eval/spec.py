"""Benchmarks as data: a YAML file per benchmark (prompt, data layout, metrics, published number) plus the
name of a Python hook kind that turns items into requests and outputs into predictions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from medlens.errors import MedlensError


class MetricSpec(BaseModel):
    """A reported metric: its name in the results and the registered metric function computing it."""

    name: str
    fn: str
    options: dict[str, Any] = Field(default_factory=dict)


class DataSpec(BaseModel):
    """Where items come from: a JSONL manifest, a parquet file or a saved HF dataset under the data root,
    or a built-in loader (``loader``) that reads data shipped with an installed package."""

    path: str | None = None
    loader: str | None = None
    fields: dict[str, str] = Field(default_factory=dict)  # item key -> column name in the data
    source: str = ""  # where the public dataset comes from, for the "data missing" error
    layout: str = ""  # what the manifest must contain


class Published(BaseModel):
    value: float | None = None
    metric: str | None = None
    model: str = "MedGemma 1.5 4B"
    note: str = ""


class BenchmarkSpec(BaseModel):
    """One benchmark. ``kind`` names the hook that builds requests and parses predictions."""

    name: str
    description: str
    kind: str
    data: DataSpec
    metrics: list[MetricSpec]
    prompt: str = ""
    options: dict[str, Any] = Field(default_factory=dict)  # kind-specific settings (labels, task, modality ...)
    generation: dict[str, Any] = Field(default_factory=dict)  # max_new_tokens, thinking, temperature
    published: Published = Field(default_factory=Published)

    @property
    def template_hash(self) -> str:
        """Changes whenever anything that shapes the prompt or the parsing changes (invalidates cached outputs)."""
        shaping = {"kind": self.kind, "prompt": self.prompt, "options": self.options}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def load_spec(path: Path) -> BenchmarkSpec:
    """Read and validate a benchmark YAML file."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
        return BenchmarkSpec.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise MedlensError(f"cannot read benchmark file ({exc})", str(path)) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MedlensError(f"invalid benchmark file: {where}: {first['msg']}", str(path)) from None
