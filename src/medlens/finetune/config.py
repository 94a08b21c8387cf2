"""The fine-tuning config: one YAML file, validated by a strict schema (an unknown key is an error naming the key
and the file), with ``key.sub=value`` overrides from the command line validated the same way.

Relative paths in a config (manifests, output folder) are relative to the current directory, as on the
command line. The shipped configs live in ``medlens/finetune/configs`` (``medlens finetune --list-configs``).
"""

from __future__ import annotations

import difflib
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medlens.errors import InputError
from medlens.prep.recipes import DEFAULT_RECIPE

#: where the shipped configs are (package data)
CONFIG_FOLDER = "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """The base model, loaded by the transformers engine exactly as ``medlens ask`` loads it."""

    name: str = "test-tiny"
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str | None = None
    #: ``4bit``: QLoRA (bitsandbytes NF4, CUDA only); ``none``: the weights in ``dtype``
    quantization: Literal["none", "4bit"] = "none"


class LoraConfig(_Strict):
    """PEFT LoRA settings (the MedGemma notebook's defaults)."""

    r: int = Field(16, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    #: extra modules trained in full and saved with the adapter (e.g. ``[lm_head]``)
    modules_to_save: list[str] = Field(default_factory=list)


class HeldOutConfig(_Strict):
    """The held-out data the training data must not overlap: a manifest, or a split of ``data.benchmark``."""

    manifest: Path | None = None
    split: str | None = None

    @model_validator(mode="after")
    def _one(self) -> HeldOutConfig:
        if (self.manifest is None) == (self.split is None):
            raise ValueError("give exactly one of 'manifest' and 'split'")
        return self


class OverlapSettings(_Strict):
    """Settings of the leakage guard (:func:`medlens.finetune.overlap.check_overlap`; docs/overlap.md)."""

    ngram: int = Field(13, ge=1)
    #: a held-out row counts as overlapping a training row when at least this share of its rare n-grams is
    #: in that row (0: any shared rare n-gram)
    text_min_share: float = Field(0.0, ge=0.0, le=1.0)
    image_hash_distance: int = Field(10, ge=0, lt=64)
    siglip_model: str | None = None


class DataConfig(_Strict):
    """Training data: a JSONL manifest (see :mod:`medlens.finetune.manifest`) or a benchmark's split."""

    manifest: Path | None = None
    benchmark: str | None = None
    split: str = "train"
    #: folder of a benchmark's data files (``--data`` of ``medlens eval``)
    root: Path | None = None
    limit: int | None = Field(None, ge=1)
    recipe: str = DEFAULT_RECIPE
    held_out: HeldOutConfig | None = None
    #: largest share of held-out rows allowed to overlap a training row
    max_overlap: float = Field(0.0, ge=0.0, le=1.0)
    overlap: OverlapSettings = Field(default_factory=OverlapSettings)
    #: drop the training rows that overlap held-out rows (instead of refusing to start)
    drop_overlapping: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.manifest is None) == (self.benchmark is None):
            raise ValueError("give exactly one of 'manifest' and 'benchmark'")
        if self.held_out is not None and self.held_out.split is not None and self.benchmark is None:
            raise ValueError("held_out.split names a split of data.benchmark; give held_out.manifest instead")
        return self


class TrainConfig(_Strict):
    """Optimisation (TRL ``SFTConfig`` fields under medlens names)."""

    epochs: float = Field(1.0, gt=0)
    #: stop after this many optimizer steps (overrides ``epochs``)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(4, ge=1)
    lr: float = Field(2e-4, gt=0)
    lr_scheduler: str = "constant"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(0.3, gt=0)
    bf16: bool = True
    gradient_checkpointing: bool = False
    #: a checkpoint (adapter, optimizer, scheduler, RNG, data position) every N optimizer steps
    save_steps: int = Field(50, ge=1)
    save_total_limit: int | None = Field(3, ge=1)
    logging_steps: int = Field(1, ge=1)
    seed: int = 42
    #: continue from the last checkpoint in the run folder when there is one
    resume: bool = True


class OutputConfig(_Strict):
    dir: Path = Path("runs/finetune")
    #: also write the base model with the adapter merged in (``DIR/merged``)
    merge: bool = False


class FinetuneConfig(_Strict):
    """A whole fine-tuning run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    #: recorded in the adapter's medlens_adapter.json (default: the task of the training rows)
    task: str | None = None
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    #: refuse to start when the memory estimate exceeds this (default: the device's memory)
    max_memory_gb: float | None = Field(None, gt=0)


def shipped_configs() -> dict[str, Path]:
    """Shipped config name (file stem) -> file."""
    folder = Path(str(files("medlens.finetune").joinpath(CONFIG_FOLDER)))
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def config_path(name_or_path: str | Path) -> Path:
    """A config file by path, or a shipped one by name (``medgemma-lora``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    close = difflib.get_close_matches(str(name_or_path), list(shipped), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (shipped: {', '.join(shipped)})"
    raise InputError(f"no such config file or shipped config{hint}", str(name_or_path))


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> FinetuneConfig:
    """Read, override (``train.lr=1e-4``; values parsed as YAML) and validate a config."""
    path = config_path(name_or_path)
    raw = read_yaml(path)
    for override in overrides or []:
        apply_override(raw, override, path)
    try:
        return FinetuneConfig.model_validate(raw)
    except ValidationError as exc:
        raise InputError(describe(exc), str(path)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file (a typed error for unreadable YAML or another top-level type)."""
    import yaml

    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read the config ({exc.strerror})", str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"invalid YAML{where}: {getattr(exc, 'problem', None) or exc}", str(path)) from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise InputError(f"a config is a mapping of keys, not a {type(value).__name__}", str(path))
    return value


def apply_override(raw: dict[str, Any], override: str, path: Path) -> None:
    """Set ``a.b=value`` in ``raw`` (``value`` read as YAML: numbers, booleans, lists); bad syntax is an error."""
    import yaml

    key, sep, text = override.partition("=")
    if not sep or not key.strip() or any(not part for part in key.split(".")):
        raise InputError(f"override {override!r} is not KEY=VALUE (e.g. train.lr=1e-4)", str(path))
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise InputError(f"override {override!r}: {part!r} is not a section", str(path))
        node = child
    node[parts[-1]] = value


def describe(exc: ValidationError) -> str:
    """One line for the first problem: an unknown key first (with the nearest valid name)."""
    errors = exc.errors(include_url=False)
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        names = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(names)}"
        return f"unknown key {key!r} ({hint})"
    if first["type"] == "missing":
        return f"missing key {key!r}"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{key}: {message}" if key else message


def _fields_at(loc: list[str]) -> list[str]:
    model: Any = FinetuneConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        annotation = field.annotation
        model = next(
            (
                a
                for a in (annotation, *getattr(annotation, "__args__", ()))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            None,
        )
    return list(model.model_fields) if model is not None else []


def dump(config: FinetuneConfig) -> dict[str, Any]:
    """The config as plain JSON-ready values (saved in the run folder)."""
    return config.model_dump(mode="json")


__all__ = [
    "DataConfig",
    "FinetuneConfig",
    "HeldOutConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "TrainConfig",
    "config_path",
    "load_config",
    "shipped_configs",
]
