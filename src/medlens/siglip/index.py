"""A persistent "find similar cases" index of MedSigLIP embeddings in a directory.

Layout::

    INDEX/meta.json                    format, model name and fingerprint, dim, the committed shards and removals
    INDEX/shards/000001.npy            (rows, dim) float32 unit embeddings of one add
    INDEX/shards/000001.jsonl          one item per row: id, source, image, label, note
    INDEX/shards/000004.removed.npy    the ids one ``remove`` took out (int64)
    INDEX/ann/000004-<tag>.usearch     the HNSW graph of every shard and removal up to number 4 (:mod:`.ann`)

Every add writes a new shard pair, every remove a new removal file (temporary files renamed into place), then
commits it by replacing ``meta.json``; only files listed there exist for readers. An add or remove that dies
half way leaves at most unlisted files, which the next one removes. Both hold a lock file, so two processes
never commit over each other. Ids are never reused: a removed image keeps its id (and its row in the shard),
masked out of every search; adding the study again gives it new ids.

Search is cosine similarity (dot products of unit vectors). Up to ``EXACT_LIMIT`` stored images every query
is compared with every vector (exact; ``np.argpartition``); above, the HNSW graph proposes candidates that
are re-scored exactly from the memory-mapped float32 shards (see docs/siglip.md for the measurements).
"""

from __future__ import annotations

import bisect
import contextlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medlens import __version__
from medlens.errors import CorruptFileError, MedlensError, NotFoundError
from medlens.files import write_atomic, write_json_atomic, write_text_atomic
from medlens.siglip import ann
from medlens.siglip.encoder import normalize_rows

INDEX_FORMAT = "medlens-siglip-index"
#: 2: removals; version 1 indexes are read as they are and written as version 2
FORMAT_VERSION = 2
META_FILE = "meta.json"
SHARD_DIR = "shards"
LOCK_FILE = ".lock"
REMOVED_SUFFIX = ".removed.npy"
#: live images up to which a query is exact (auto). bench/search_scale.py on 2 cores, three runs: an exact query
#: over 10,000 MedSigLIP (1152-d) vectors takes 0.76-1.04 ms (median), a graph query over 250,000 0.68-1.03 ms
EXACT_LIMIT = 10_000
METHODS = ("auto", "exact", "ann")


@dataclass(frozen=True)
class IndexEntry:
    """What is stored with an embedding: the study it came from, its image number, optional label and note."""

    source: str
    image: int
    label: str | None = None
    note: str | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.source, self.image)


@dataclass(frozen=True)
class IndexItem(IndexEntry):
    """An entry in the index, with its id (0-based, in order of addition)."""

    id: int = -1


@dataclass(frozen=True)
class Hit:
    """One search result."""

    rank: int
    score: float
    item: IndexItem

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": round(self.score, 6), **asdict(self.item)}


@dataclass(frozen=True)
class AddResult:
    added: int
    skipped: int


@dataclass(frozen=True)
class RemoveResult:
    """What a remove took out, and what it was asked for but the index does not hold (live)."""

    removed: int
    studies: int
    not_found: list[str] = field(default_factory=list)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory/.lock`` (POSIX; elsewhere adds are not guarded against each other)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with (directory / LOCK_FILE).open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class SiglipIndex:
    """Embeddings of one model and their items; open with :meth:`open`, :meth:`create` or :meth:`open_or_create`."""

    def __init__(self, directory: Path, meta: dict[str, Any], settings: ann.AnnSettings = ann.DEFAULT_ANN) -> None:
        self.directory = directory
        self.ann_settings = settings
        self._set_meta(meta)

    def _set_meta(self, meta: dict[str, Any]) -> None:
        self._meta = meta
        self._embeddings: np.ndarray | None = None
        self._items: list[IndexItem] | None = None
        self._removed: np.ndarray | None = None
        self._arrays: dict[int, np.ndarray] = {}
        self._shard_items: dict[int, list[IndexItem]] = {}
        self._shard_lines: dict[int, tuple[bytes, np.ndarray]] = {}
        self._graph: Any = None
        self._starts = list(np.cumsum([0] + [int(s["rows"]) for s in self.shards])[:-1])

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, directory: str | Path, settings: ann.AnnSettings = ann.DEFAULT_ANN) -> SiglipIndex:
        """The index at ``directory``; ``settings``: the HNSW settings of its graph (benchmarks try others)."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            reason = "no such index folder" if not directory.exists() else f"not a medlens index (no {META_FILE})"
            raise NotFoundError(reason, str(directory))
        return cls(directory, cls._read_meta(meta_path), settings)

    @classmethod
    def create(cls, directory: str | Path, model: str, fingerprint: str, dim: int) -> SiglipIndex:
        directory = Path(directory)
        if (directory / META_FILE).exists():
            raise MedlensError("an index already exists here", str(directory))
        if directory.is_file():
            raise MedlensError("is a file, not a folder for an index", str(directory))
        (directory / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        meta = {
            "format": INDEX_FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model,
            "fingerprint": fingerprint,
            "dim": int(dim),
            "medlens_version": __version__,
            "created": _now(),
            "updated": _now(),
            "count": 0,
            "removed": 0,
            "shards": [],
            "removals": [],
        }
        with _locked(directory):
            if (directory / META_FILE).exists():  # another process created it meanwhile
                return cls.open(directory)
            write_json_atomic(directory / META_FILE, meta)
        return cls(directory, meta)

    @classmethod
    def open_or_create(cls, directory: str | Path, model: str, fingerprint: str, dim: int) -> SiglipIndex:
        """Open the index at ``directory`` (refusing another model's) or create an empty one."""
        if (Path(directory) / META_FILE).is_file():
            index = cls.open(directory)
            index.check_compatible(model, fingerprint, dim)
            return index
        return cls.create(directory, model, fingerprint, dim)

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CorruptFileError(f"unreadable index metadata ({exc})", str(path)) from None
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            raise CorruptFileError(f"not a {INDEX_FORMAT} metadata file", str(path))
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise MedlensError(
                f"index format {meta['format_version']} is newer than this medlens reads ({FORMAT_VERSION})",
                str(path.parent),
            )
        return {"removed": 0, "removals": [], **meta}

    def _reload(self) -> None:
        """Re-read ``meta.json`` (another process may have committed); caches go with the old state."""
        meta = self._read_meta(self.directory / META_FILE)
        if meta != self._meta:
            self._set_meta(meta)

    # ------------------------------------------------------------ what it holds

    @property
    def model(self) -> str:
        return str(self._meta["model"])

    @property
    def fingerprint(self) -> str:
        return str(self._meta["fingerprint"])

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self._meta["shards"])

    @property
    def removals(self) -> list[dict[str, Any]]:
        return list(self._meta["removals"])

    @property
    def state(self) -> int:
        """The number of the last committed shard or removal (0 for an empty index)."""
        return max((int(s["name"]) for s in [*self.shards, *self.removals]), default=0)

    @property
    def next_id(self) -> int:
        return int(self._meta["count"])

    def __len__(self) -> int:
        """Live images (removed ones not counted)."""
        return int(self._meta["count"]) - int(self._meta["removed"])

    def check_compatible(self, model: str, fingerprint: str, dim: int) -> None:
        """Refuse embeddings of another dimension or another model (by fingerprint) with a clear error."""
        if int(dim) != self.dim:
            raise MedlensError(
                f"the index holds {self.dim}-dimensional embeddings (model {self.model!r}), not {dim}-dimensional "
                f"ones (model {model!r}); use another index",
                str(self.directory),
            )
        if fingerprint != self.fingerprint:
            raise MedlensError(
                f"the index holds embeddings of model {self.model!r} (fingerprint {self.fingerprint}), not of "
                f"{model!r} (fingerprint {fingerprint}); use --model {self.model} or another index",
                str(self.directory),
            )

    def _shard_path(self, name: str, suffix: str) -> Path:
        return self.directory / SHARD_DIR / f"{name}{suffix}"

    def shard_array(self, number: int) -> np.ndarray:
        """The vectors of shard ``number`` (position in ``shards``), memory-mapped, checked against meta."""
        if number not in self._arrays:
            shard = self.shards[number]
            path = self._shard_path(shard["name"], ".npy")
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise CorruptFileError(f"unreadable index shard ({exc})", str(path)) from None
            if array.shape != (shard["rows"], self.dim) or array.dtype != np.float32:
                raise CorruptFileError(
                    f"shard holds {array.shape} {array.dtype} embeddings, the index expects {shard['rows']} float32 "
                    f"of dimension {self.dim}",
                    str(path),
                )
            self._arrays[number] = array
        return self._arrays[number]

    def shard_items(self, number: int) -> list[IndexItem]:
        if number not in self._shard_items:
            shard = self.shards[number]
            path = self._shard_path(shard["name"], ".jsonl")
            try:
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                items = [IndexItem(**row) for row in rows]
            except (OSError, ValueError, TypeError) as exc:
                raise CorruptFileError(f"unreadable index shard ({exc})", str(path)) from None
            if len(items) != shard["rows"]:
                raise CorruptFileError(f"shard lists {len(items)} items, the index expects {shard['rows']}", str(path))
            self._shard_items[number] = items
        return self._shard_items[number]

    def _shard_of(self, item_id: int) -> int:
        return bisect.bisect_right(self._starts, item_id) - 1

    def shard_ids(self, number: int) -> np.ndarray:
        start = int(self._starts[number])
        return np.arange(start, start + int(self.shards[number]["rows"]), dtype=np.int64)

    def item(self, item_id: int) -> IndexItem:
        """One item; only its line is parsed (a graph query over 250,000 items reads 10 lines, not all)."""
        number = self._shard_of(item_id)
        row = item_id - int(self._starts[number])
        if number in self._shard_items:
            return self._shard_items[number][row]
        if number not in self._shard_lines:
            path = self._shard_path(self.shards[number]["name"], ".jsonl")
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise CorruptFileError(f"unreadable index shard ({exc})", str(path)) from None
            self._shard_lines[number] = raw, np.flatnonzero(np.frombuffer(raw, np.uint8) == ord("\n"))
        raw, ends = self._shard_lines[number]
        if len(ends) != self.shards[number]["rows"]:  # not one line per item as written: the full check names it
            return self.shard_items(number)[row]
        start = int(ends[row - 1]) + 1 if row else 0
        try:
            return IndexItem(**json.loads(raw[start : int(ends[row])]))
        except (ValueError, TypeError):
            return self.shard_items(number)[row]

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored float32 vectors of ``ids`` (from the mapped shards: only those rows are read)."""
        out = np.zeros((len(ids), self.dim), np.float32)
        for row, item_id in enumerate(ids):
            number = self._shard_of(int(item_id))
            out[row] = self.shard_array(number)[int(item_id) - int(self._starts[number])]
        return out

    @property
    def embeddings(self) -> np.ndarray:
        """Every stored vector, row = id (removed ones included: see :meth:`removed_ids`)."""
        if self._embeddings is None:
            arrays = [np.zeros((0, self.dim), np.float32)]
            arrays.extend(np.asarray(self.shard_array(n)) for n in range(len(self.shards)))
            self._embeddings = np.concatenate(arrays)
        return self._embeddings

    @property
    def items(self) -> list[IndexItem]:
        """Every item, position = id (removed ones included)."""
        if self._items is None:
            self._items = [item for n in range(len(self.shards)) for item in self.shard_items(n)]
        return self._items

    def removed_ids(self) -> np.ndarray:
        """Sorted ids taken out by removals."""
        if self._removed is None:
            found = [np.zeros(0, np.int64)]
            for removal in self.removals:
                path = self._shard_path(removal["name"], REMOVED_SUFFIX)
                try:
                    ids = np.load(path, allow_pickle=False)
                except (OSError, ValueError) as exc:
                    raise CorruptFileError(f"unreadable removal file ({exc})", str(path)) from None
                if ids.shape != (removal["rows"],):
                    raise CorruptFileError(f"removal holds {ids.shape} ids, not {removal['rows']}", str(path))
                found.append(ids.astype(np.int64))
            self._removed = np.unique(np.concatenate(found))
        return self._removed

    def live_items(self) -> list[IndexItem]:
        removed = set(self.removed_ids().tolist())
        return [item for item in self.items if item.id not in removed]

    def sources(self) -> set[str]:
        """The studies with at least one (live) embedding in the index."""
        return {item.source for item in self.live_items()}

    # ------------------------------------------------------------ adding and removing

    def add(self, embeddings: np.ndarray, entries: Sequence[IndexEntry]) -> AddResult:
        """Append embeddings (one per entry) as a new shard; entries whose (source, image) is already in the
        index, or repeated within this call, are skipped. Atomic: readers see all of it or none."""
        vectors = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        if len(vectors) != len(entries):
            raise ValueError(f"{len(vectors)} embeddings for {len(entries)} entries")
        if len(entries) and vectors.shape[1] != self.dim:
            raise MedlensError(
                f"embeddings of dimension {vectors.shape[1]} cannot join an index of dimension {self.dim}",
                str(self.directory),
            )
        if not np.isfinite(vectors).all():
            raise MedlensError("embeddings with NaN or infinite values cannot be indexed", str(self.directory))
        with _locked(self.directory):
            self._reload()
            seen = {item.key for item in self.live_items()}
            keep = []
            for row, entry in enumerate(entries):
                if entry.key not in seen:
                    seen.add(entry.key)
                    keep.append(row)
            if keep:
                self._commit_shard(normalize_rows(vectors[keep]), [entries[row] for row in keep])
        return AddResult(added=len(keep), skipped=len(entries) - len(keep))

    def remove(self, sources: Iterable[str] = (), ids: Iterable[int] = ()) -> RemoveResult:
        """Take out every image of ``sources`` and the images ``ids``; what the index does not hold (live) is
        reported in ``not_found``. Atomic like :meth:`add`."""
        wanted_sources, wanted_ids = list(dict.fromkeys(sources)), list(dict.fromkeys(int(i) for i in ids))
        with _locked(self.directory):
            self._reload()
            live = self.live_items()
            by_source: dict[str, list[int]] = {}
            for item in live:
                by_source.setdefault(item.source, []).append(item.id)
            live_ids = {item.id for item in live}
            targets = {i for s in wanted_sources for i in by_source.get(s, [])}
            targets.update(i for i in wanted_ids if i in live_ids)
            not_found = [s for s in wanted_sources if s not in by_source]
            not_found += [f"id {i}" for i in wanted_ids if i not in live_ids]
            if targets:
                self._commit_removal(np.array(sorted(targets), np.int64))
        studies = {self.item(i).source for i in targets}
        return RemoveResult(removed=len(targets), studies=len(studies), not_found=not_found)

    def _next_name(self) -> str:
        self._remove_unlisted(self.directory / SHARD_DIR, {s["name"] for s in [*self.shards, *self.removals]})
        return f"{self.state + 1:06d}"

    def _commit_shard(self, vectors: np.ndarray, entries: list[IndexEntry]) -> None:
        name = self._next_name()
        first = self.next_id
        items = [IndexItem(e.source, e.image, e.label, e.note, first + i) for i, e in enumerate(entries)]
        lines = "".join(json.dumps(asdict(item), ensure_ascii=False) + "\n" for item in items)
        write_atomic(self._shard_path(name, ".npy"), lambda h: np.save(h, vectors, allow_pickle=False))
        write_text_atomic(self._shard_path(name, ".jsonl"), lines)
        self._write_meta(count=first + len(items), shards=[*self.shards, {"name": name, "rows": len(items)}])

    def _commit_removal(self, ids: np.ndarray) -> None:
        name = self._next_name()
        write_atomic(self._shard_path(name, REMOVED_SUFFIX), lambda h: np.save(h, ids, allow_pickle=False))
        removals = [*self.removals, {"name": name, "rows": len(ids)}]
        self._write_meta(removed=int(self._meta["removed"]) + len(ids), removals=removals)

    def _write_meta(self, **changes: Any) -> None:
        meta = {**self._meta, **changes, "format_version": FORMAT_VERSION, "updated": _now()}
        write_json_atomic(self.directory / META_FILE, meta)  # the commit point
        self._set_meta(meta)

    @staticmethod
    def _remove_unlisted(folder: Path, listed: set[str]) -> None:
        """Files left by an add or remove that never committed."""
        folder.mkdir(exist_ok=True)
        for path in folder.iterdir():
            if path.name.split(".")[0] not in listed:  # temporary files start with "." and never match
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------ searching

    def method_for(self, method: str = "auto") -> str:
        """``exact`` or ``ann``: what ``search(method=...)`` will do."""
        if method not in METHODS:
            raise MedlensError(f"search method must be one of {', '.join(METHODS)}, not {method!r}")
        if method == "auto":
            return "exact" if len(self) <= EXACT_LIMIT else "ann"
        return method

    def search(self, query: np.ndarray, top_k: int = 5, method: str = "auto") -> list[Hit]:
        """The ``top_k`` items most similar (cosine) to the ``(dim,)`` query, best first (ties by id)."""
        vector = np.asarray(query, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.dim:
            raise MedlensError(
                f"a {vector.shape[0]}-dimensional query cannot search an index of dimension {self.dim}",
                str(self.directory),
            )
        if top_k < 1:
            raise MedlensError(f"top-k must be at least 1, not {top_k}")
        chosen = self.method_for(method)
        if len(self) == 0:
            return []
        unit = normalize_rows(vector[None])[0]
        ids, scores = self._exact(unit, top_k) if chosen == "exact" else self._approximate(unit, top_k)
        pairs = zip(ids.tolist(), scores.tolist(), strict=True)
        return [Hit(rank, score, self.item(item_id)) for rank, (item_id, score) in enumerate(pairs, start=1)]

    def _exact(self, unit: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = self.embeddings @ unit
        scores[self.removed_ids()] = -np.inf
        k = min(top_k, len(self))
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.lexsort((best, -scores[best]))]  # by score, ties by id
        return best, scores[best]

    def _approximate(self, unit: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidates from the graph, re-scored with the stored float32 vectors (the scores are exact)."""
        candidates = ann.neighbours(self.graph(), unit, self.ann_settings.count(top_k))
        candidates = candidates[~np.isin(candidates, self.removed_ids())]
        scores = self.vectors(candidates) @ unit
        order = np.lexsort((candidates, -scores))[:top_k]
        return candidates[order], scores[order]

    def graph(self) -> Any:
        """The HNSW graph of the live vectors: the file in ``INDEX/ann`` when it is current (memory-mapped),
        else brought up to date (:meth:`sync_graph`)."""
        if self._graph is None:
            path = ann.graph_path(self.directory, self.state, self.ann_settings)
            graph = ann.open_graph(path, self.dim, len(self), self.ann_settings, view=True)
            self._graph = graph if graph is not None else self.sync_graph()
        return self._graph

    def sync_graph(self) -> Any:
        """Bring ``INDEX/ann`` up to date with ``meta.json``: from the newest graph of these settings by adding
        and removing what was committed since, else rebuilt from the shards; saved (atomically) when the
        folder is writable. Returns the graph."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(_locked(self.directory))
                writable = True
            except OSError:  # a read-only index: the graph lives in memory only
                writable = False
            self._reload()
            self._graph = ann.current_graph(self, save=writable)
        return self._graph

    def info(self) -> dict[str, Any]:
        """A summary for ``medlens search info``."""
        live = self.live_items()
        labels = Counter(item.label for item in live if item.label)
        graphs = [g for g in ann.graph_files(self.directory) if g.tag == self.ann_settings.tag]
        return {
            "path": str(self.directory),
            "format_version": self._meta["format_version"],
            "model": self.model,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "count": len(self),
            "removed": int(self._meta["removed"]),
            "sources": len({item.source for item in live}),
            "labels": dict(sorted(labels.items())),
            "shards": len(self.shards),
            "search": self.method_for("auto"),
            "ann_graph": graphs[0].path.name if graphs else None,
            "ann_graph_current": bool(graphs) and graphs[0].state == self.state,
            "created": self._meta["created"],
            "updated": self._meta["updated"],
            "medlens_version": self._meta["medlens_version"],
        }
