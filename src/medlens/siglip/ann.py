"""Approximate nearest neighbours for the similar-case index: usearch's HNSW graph over the unit vectors.

The graph is derived data, kept next to the shards as ``INDEX/ann/<state>-<tag>.usearch``: ``state`` is the
number of the last shard or removal it covers (shards and removals share one counter and are never rewritten,
so that number says exactly what the graph holds) and ``tag`` is a hash of the build settings. A file is
written under a temporary name and renamed, so a reader finds a whole graph or none; one that is missing,
unreadable, of other settings or behind ``meta.json`` is rebuilt or brought up to date from the shards.

Settings (``DEFAULT_ANN``) were tuned with ``bench/search_scale.py`` on 250,000 clustered 1152-d vectors; the
figures are in docs/siglip.md. usearch is imported when a graph is built or opened.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medlens.errors import MedlensError
from medlens.files import json_hash
from medlens.io.worker_pool import usable_cores

ANN_DIR = "ann"
SUFFIX = ".usearch"
_NAME = re.compile(r"^(\d{6})-([0-9a-f]{8})\.usearch$")


@dataclass(frozen=True)
class AnnSettings:
    """HNSW settings. ``connectivity`` (M), ``expansion_add`` (ef at build), ``dtype`` (how the graph stores
    vectors: f32, f16 or i8) shape the file; ``expansion_search`` (ef at query) and ``candidates`` (how many
    neighbours the graph proposes per result wanted, re-scored exactly from the float32 shards) do not."""

    connectivity: int = 16
    expansion_add: int = 64
    expansion_search: int = 128
    dtype: str = "i8"
    metric: str = "ip"
    candidates: int = 3

    @property
    def tag(self) -> str:
        """What the file depends on, hashed: a graph of other settings is stale."""
        built = {k: v for k, v in asdict(self).items() if k not in ("expansion_search", "candidates")}
        return json_hash(built, 8)

    def count(self, top_k: int) -> int:
        """Neighbours to ask the graph for, to return ``top_k`` re-scored ones."""
        return max(self.candidates * top_k, top_k + 10)


DEFAULT_ANN = AnnSettings()


def _usearch() -> Any:
    """usearch's ``Index``, imported after Ray's native core when Ray is installed: with usearch's extension
    loaded first, a later ``ray.init`` in the same process aborts it (a C++ ``std::regex_error``, "Invalid
    range in brace expression", in Ray's GCS client; usearch 2.26, Ray 2.60, three runs out of three), while
    the other order works. Loading ``ray._raylet`` costs 0.3 s, once, when a graph is first used."""
    with contextlib.suppress(ImportError):
        import ray._raylet  # noqa: F401
    try:
        from usearch.index import Index
    except ImportError:  # pragma: no cover - usearch is in the scale extra
        raise MedlensError(
            "a large index needs usearch (pip install 'medlens[scale]'), or search it with --method exact"
        ) from None
    return Index


def new_graph(dim: int, settings: AnnSettings = DEFAULT_ANN) -> Any:
    """An empty usearch index for unit vectors of ``dim``."""
    index_class = _usearch()
    return index_class(
        ndim=int(dim),
        metric=settings.metric,
        dtype=settings.dtype,
        connectivity=settings.connectivity,
        expansion_add=settings.expansion_add,
        expansion_search=settings.expansion_search,
    )


def add_vectors(graph: Any, ids: np.ndarray, vectors: np.ndarray, chunk: int = 65536) -> None:
    """Insert rows with their ids (usearch keys), a chunk at a time (memory of mapped shards stays bounded)."""
    threads = usable_cores()
    for start in range(0, len(ids), chunk):
        keys = np.asarray(ids[start : start + chunk], dtype=np.uint64)
        graph.add(keys, np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32), threads=threads)


def remove_ids(graph: Any, ids: np.ndarray) -> None:
    """Take ids out of the graph (ids it does not hold are ignored)."""
    present = [int(i) for i in ids if graph.contains(int(i))]
    if present:
        graph.remove(np.asarray(present, dtype=np.uint64))


def neighbours(graph: Any, vector: np.ndarray, count: int) -> np.ndarray:
    """Ids of up to ``count`` approximate nearest neighbours of one vector (one thread: one query at a time)."""
    if len(graph) == 0:
        return np.zeros(0, np.int64)
    matches = graph.search(np.asarray(vector, np.float32), min(count, len(graph)), threads=1)
    return np.asarray(matches.keys, dtype=np.int64)


@dataclass(frozen=True)
class GraphFile:
    """One graph file: the state it covers and its settings tag."""

    path: Path
    state: int
    tag: str


def graph_files(directory: Path) -> list[GraphFile]:
    """The graph files in ``INDEX/ann``, newest state first."""
    folder = directory / ANN_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append(GraphFile(path, int(match.group(1)), match.group(2)))
    return sorted(found, key=lambda f: -f.state)


def graph_path(directory: Path, state: int, settings: AnnSettings = DEFAULT_ANN) -> Path:
    return directory / ANN_DIR / f"{state:06d}-{settings.tag}{SUFFIX}"


def open_graph(path: Path, dim: int, expected: int, settings: AnnSettings, view: bool) -> Any | None:
    """The graph in ``path`` (memory-mapped when ``view``: read-only, never to be changed), or None when it is
    missing, unreadable or not what the index expects (``expected`` vectors of ``dim``)."""
    index_class = _usearch()
    try:
        graph = index_class.restore(str(path), view=view)
    except (OSError, ValueError, RuntimeError):
        return None
    if graph is None or graph.ndim != dim or len(graph) != expected:
        return None
    graph.expansion_search = settings.expansion_search  # not stored in the file
    return graph


def save_graph(graph: Any, path: Path) -> Path:
    """Write the graph to a temporary file next to ``path``, sync it, rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        graph.save(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def remove_other_graphs(directory: Path, keep: Path) -> None:
    """Old graphs and temporary files of interrupted saves (a reader that mapped one keeps its mapping)."""
    folder = directory / ANN_DIR
    for path in folder.iterdir() if folder.is_dir() else []:
        if path != keep and (path.suffix == SUFFIX or path.name.endswith(".tmp")):
            with contextlib.suppress(OSError):
                path.unlink()


class IndexFiles(Protocol):
    """What :func:`current_graph` reads of a :class:`~medlens.siglip.index.SiglipIndex`."""

    directory: Path
    ann_settings: AnnSettings

    @property
    def dim(self) -> int: ...

    @property
    def state(self) -> int: ...

    @property
    def shards(self) -> list[dict[str, Any]]: ...

    @property
    def removals(self) -> list[dict[str, Any]]: ...

    def __len__(self) -> int: ...

    def shard_array(self, number: int) -> np.ndarray: ...

    def shard_ids(self, number: int) -> np.ndarray: ...

    def removed_ids(self) -> np.ndarray: ...


def _live_at(index: IndexFiles, state: int) -> int:
    """Live vectors once every shard and removal numbered up to ``state`` is applied."""
    rows = sum(int(s["rows"]) for s in index.shards if int(s["name"]) <= state)
    return rows - sum(int(r["rows"]) for r in index.removals if int(r["name"]) <= state)


def _add_shards(graph: Any, index: IndexFiles, after: int) -> None:
    """Add the live vectors of the shards numbered above ``after``."""
    removed = index.removed_ids()
    for number, shard in enumerate(index.shards):
        if int(shard["name"]) > after:
            ids = index.shard_ids(number)
            live = ~np.isin(ids, removed)
            add_vectors(graph, ids[live], index.shard_array(number)[live])


def current_graph(index: IndexFiles, save: bool) -> Any:
    """The graph of ``index`` as of its ``meta.json``: the current file, else the newest older file of the same
    settings with what was committed since applied, else built from the shards; written when ``save``."""
    settings, state = index.ann_settings, index.state
    for found in graph_files(index.directory):
        if found.tag != settings.tag or found.state > state:
            continue
        current = found.state == state
        graph = open_graph(found.path, index.dim, _live_at(index, found.state), settings, view=current)
        if graph is None:
            continue
        if current:
            return graph
        _add_shards(graph, index, after=found.state)
        later = [r for r in index.removals if int(r["name"]) > found.state]
        if later:
            remove_ids(graph, index.removed_ids())
        break
    else:
        graph = new_graph(index.dim, settings)
        _add_shards(graph, index, after=0)
    if save:
        path = save_graph(graph, graph_path(index.directory, state, settings))
        remove_other_graphs(index.directory, keep=path)
    return graph
