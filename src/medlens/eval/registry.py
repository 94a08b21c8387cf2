"""Where benchmarks are found: the built-in YAML files, folders in ``MEDLENS_BENCHMARKS``, or a YAML path."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from medlens.eval.kinds import Kind, kind_class
from medlens.eval.spec import BenchmarkSpec, load_spec
from medlens.registry import Registry


def benchmark_files() -> dict[str, Path]:
    """Benchmark name -> YAML file; user folders (``MEDLENS_BENCHMARKS``, ``:``-separated) override built-ins."""
    folders = [Path(str(files("medlens.eval").joinpath("benchmarks")))]
    folders += [Path(p).expanduser() for p in os.environ.get("MEDLENS_BENCHMARKS", "").split(os.pathsep) if p]
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            found[path.stem] = path
    return found


def get_benchmark(name_or_path: str) -> tuple[BenchmarkSpec, Path]:
    """A benchmark by name (did-you-mean on typos) or by the path of its YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return load_spec(path), path
    known: Registry[Path] = Registry("benchmark")
    for name, file in benchmark_files().items():
        known.add(name, file)
    file = known.get(name_or_path)
    return load_spec(file), file


def make_kind(spec: BenchmarkSpec, spec_path: Path, recipe: str) -> Kind:
    """The hook object of a benchmark: a registered kind, or ``hooks.py:ClassName`` next to the YAML file."""
    return kind_class(spec.kind, spec_path.parent)(spec, recipe)
