"""Benchmarks as data: a YAML file per benchmark (prompt, data layout, metrics, published number) plus the
name of a Python hook kind that turns items into requests and outputs into predictions.

Files are strict: :func:`load_spec` refuses an unknown key at any level, an unknown metric function, kind or
loader, and options of the wrong name or type (the metric's and the kind's own options models), before any
data is read or any model loaded; the error names the file, the key path and the nearest valid name.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medlens.errors import MedlensError, UnknownNameError
from medlens.eval.checks import SpecProblem, dotted, suggestion, unknown_key, validated
from medlens.registry import Registry

#: built-in data loaders: name -> "module:function" returning the items
LOADERS: Registry[str] = Registry("data loader")
LOADERS.add("iu-cxr-reports", "medlens.eval.iu_cxr:load_items")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MetricSpec(_Strict):
    """A reported metric: its name in the results and the registered metric function computing it, with the
    options that function takes (checked against its options model)."""

    name: str
    fn: str
    options: dict[str, Any] = Field(default_factory=dict)


class DataSpec(_Strict):
    """Where items come from: a JSONL manifest, a parquet file or a saved HF dataset under the data root,
    or a built-in loader (``loader``) that reads data shipped with an installed package."""

    path: str | None = None
    loader: str | None = None
    fields: dict[str, str] = Field(default_factory=dict)  # item key -> column name in the data
    source: str = ""  # where the public dataset comes from, for the "data missing" error
    layout: str = ""  # what the manifest must contain

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.path is None) == (self.loader is None):
            raise ValueError("give exactly one of 'path' and 'loader'")
        return self


class Published(_Strict):
    value: float | None = None
    metric: str | None = None
    model: str = "MedGemma 1.5 4B"
    note: str = ""


class Generation(_Strict):
    """Decoding settings: greedy by default; ``thinking`` switches on MedGemma's thinking mode in every prompt;
    ``seed`` goes into every request (sampling) and into the journal key."""

    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    thinking: bool = False
    seed: int = Field(default=0, ge=0)

    def resolved(self, default_max_new_tokens: int) -> Generation:
        """These settings with the backend's default filled in for an unset ``max_new_tokens``."""
        return self.model_copy(update={"max_new_tokens": self.max_new_tokens or default_max_new_tokens})


class BenchmarkSpec(_Strict):
    """One benchmark. ``kind`` names the hook that builds requests and parses predictions; ``options`` are
    the kind's settings (validated by the kind's options model)."""

    name: str
    description: str
    kind: str
    data: DataSpec
    metrics: list[MetricSpec] = Field(min_length=1)
    prompt: str = ""
    options: dict[str, Any] = Field(default_factory=dict)
    generation: Generation = Field(default_factory=Generation)
    published: Published = Field(default_factory=Published)

    @property
    def template_hash(self) -> str:
        """Changes whenever anything that shapes the prompt or the parsing changes (invalidates cached outputs);
        the generation settings (thinking included) are part of the journal key besides."""
        shaping = {"kind": self.kind, "prompt": self.prompt, "options": self.options}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def load_spec(path: Path) -> BenchmarkSpec:
    """Read and validate a benchmark YAML file: its keys, metric functions and options, kind and kind options."""
    path = Path(path)
    raw = _read_yaml(path)
    try:
        spec = validated(BenchmarkSpec, raw)
        check_spec(spec, path.parent)
    except SpecProblem as exc:
        raise MedlensError(exc.reason, str(path)) from None
    return spec


def check_spec(spec: BenchmarkSpec, folder: Path) -> None:
    """What the models alone cannot check: registered names, per-metric and per-kind options; ``folder``
    holds the file (``hooks.py`` kinds). Raises :class:`SpecProblem`."""
    from medlens.eval.kinds import check_kind_options, kind_class

    _check_metrics(spec)
    check_kind_options(kind_class(spec.kind, folder), spec.options)
    _check_loader(spec)


def _check_metrics(spec: BenchmarkSpec) -> None:
    from medlens.metrics.functions import METRICS, metric_options

    names: list[str] = []
    for i, metric in enumerate(spec.metrics):
        if metric.name in names:
            raise SpecProblem(("metrics", i, "name"), f"metrics[{i}].name: {metric.name!r} is given twice")
        names.append(metric.name)
        if metric.fn not in METRICS:
            reason = _unknown_reason(METRICS, metric.fn)
            raise SpecProblem(("metrics", i, "fn"), f"metrics[{i}].fn: {reason}")
        model = metric_options(metric.fn)
        if metric.options and not model.model_fields:
            where = ("metrics", i, "options", next(iter(metric.options)))
            raise SpecProblem(where, f"unknown key {dotted(where)!r} (metric {metric.fn} takes no options)")
        validated(model, metric.options, ("metrics", i, "options"))
    published = spec.published.metric
    if published is not None and published not in names:
        reason = f"{published!r} is none of the metrics ({suggestion(published, names)})"
        raise SpecProblem(("published", "metric"), f"published.metric: {reason}")


def _check_loader(spec: BenchmarkSpec) -> None:
    given = spec.options.get("loader_options") or {}
    if spec.data.loader is None:
        if given:
            raise SpecProblem(("options", "loader_options"), "options.loader_options: only for a data.loader")
        return
    if spec.data.loader not in LOADERS:
        reason = _unknown_reason(LOADERS, spec.data.loader)
        raise SpecProblem(("data", "loader"), f"data.loader: {reason}")
    accepted = list(inspect.signature(loader_function(spec.data.loader)).parameters)
    for key in given:
        if key not in accepted:
            raise unknown_key(("options", "loader_options", key), accepted)


def loader_function(name: str) -> Callable[..., list[dict[str, Any]]]:
    """The function of the built-in loader ``name``."""
    module, _, attr = LOADERS.get(name).partition(":")
    return getattr(importlib.import_module(module), attr)


def _unknown_reason(registry: Registry[Any], name: str) -> str:
    """The did-you-mean message of a name ``registry`` does not hold."""
    try:
        registry.get(name)
    except UnknownNameError as exc:
        return exc.reason
    return f"{name!r} is registered"


def _read_yaml(path: Path) -> Any:
    """The YAML document of ``path``; a key given twice in one mapping is an error (the last would win)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # a SafeLoader subclass
    except OSError as exc:
        raise MedlensError(f"cannot read benchmark file ({exc})", str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise MedlensError(f"invalid YAML{where}: {getattr(exc, 'problem', None) or exc}", str(path)) from None
