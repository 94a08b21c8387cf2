"""A persistent "find similar cases" index of MedSigLIP embeddings in a directory.

Layout::

    INDEX/meta.json              format, model name and fingerprint, dim, the committed shards
    INDEX/shards/000001.npy      (rows, dim) float32 unit embeddings of one add
    INDEX/shards/000001.jsonl    one item per row: id, source, image, label, note

Every add writes a new shard pair (temporary files renamed into place), then commits it by replacing
``meta.json``; only shards listed there exist for readers. An add that dies half way leaves at most unlisted
files, which the next add removes. Adds hold a lock file, so two processes never commit over each other.
Search is cosine similarity (dot products of unit vectors), top-k by ``np.argpartition``.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medlens import __version__
from medlens.errors import CorruptFileError, MedlensError, NotFoundError
from medlens.files import write_atomic, write_json_atomic, write_text_atomic
from medlens.siglip.encoder import normalize_rows

INDEX_FORMAT = "medlens-siglip-index"
FORMAT_VERSION = 1
META_FILE = "meta.json"
SHARD_DIR = "shards"
LOCK_FILE = ".lock"


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

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory = directory
        self._meta = meta
        self._embeddings: np.ndarray | None = None
        self._items: list[IndexItem] | None = None

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, directory: str | Path) -> SiglipIndex:
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            reason = "no such index folder" if not directory.exists() else f"not a medlens index (no {META_FILE})"
            raise NotFoundError(reason, str(directory))
        return cls(directory, cls._read_meta(meta_path))

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
            "shards": [],
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
        return meta

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

    def __len__(self) -> int:
        return int(self._meta["count"])

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

    def _load(self) -> None:
        embeddings = [np.zeros((0, self.dim), np.float32)]
        items: list[IndexItem] = []
        for shard in self._meta["shards"]:
            array_path = self.directory / SHARD_DIR / f"{shard['name']}.npy"
            items_path = self.directory / SHARD_DIR / f"{shard['name']}.jsonl"
            try:
                array = np.load(array_path, allow_pickle=False)
                rows = [json.loads(line) for line in items_path.read_text().splitlines() if line.strip()]
            except (OSError, ValueError) as exc:
                raise CorruptFileError(f"unreadable index shard ({exc})", str(array_path)) from None
            if array.shape != (shard["rows"], self.dim) or len(rows) != shard["rows"]:
                raise CorruptFileError(
                    f"shard holds {array.shape} embeddings and {len(rows)} items, the index expects "
                    f"{shard['rows']} of dimension {self.dim}",
                    str(array_path),
                )
            embeddings.append(array.astype(np.float32, copy=False))
            items.extend(IndexItem(**row) for row in rows)
        self._embeddings = np.concatenate(embeddings)
        self._items = items

    @property
    def embeddings(self) -> np.ndarray:
        if self._embeddings is None:
            self._load()
        assert self._embeddings is not None
        return self._embeddings

    @property
    def items(self) -> list[IndexItem]:
        if self._items is None:
            self._load()
        assert self._items is not None
        return self._items

    def sources(self) -> set[str]:
        """The studies with at least one embedding in the index."""
        return {item.source for item in self.items}

    # ------------------------------------------------------------ adding

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
            self._meta = self._read_meta(self.directory / META_FILE)  # another process may have added
            self._embeddings = self._items = None
            seen = {item.key for item in self.items}
            keep = []
            for row, entry in enumerate(entries):
                if entry.key not in seen:
                    seen.add(entry.key)
                    keep.append(row)
            if keep:
                self._commit(normalize_rows(vectors[keep]), [entries[row] for row in keep])
        return AddResult(added=len(keep), skipped=len(entries) - len(keep))

    def _commit(self, vectors: np.ndarray, entries: list[IndexEntry]) -> None:
        shards = list(self._meta["shards"])
        number = 1 + max((int(s["name"]) for s in shards), default=0)
        name = f"{number:06d}"
        folder = self.directory / SHARD_DIR
        folder.mkdir(exist_ok=True)
        self._remove_unlisted(folder, {s["name"] for s in shards})
        first = len(self)
        items = [IndexItem(e.source, e.image, e.label, e.note, first + i) for i, e in enumerate(entries)]
        lines = "".join(json.dumps(asdict(item), ensure_ascii=False) + "\n" for item in items)
        write_atomic(folder / f"{name}.npy", lambda h: np.save(h, vectors, allow_pickle=False))
        write_text_atomic(folder / f"{name}.jsonl", lines)
        meta = {
            **self._meta,
            "count": first + len(items),
            "updated": _now(),
            "shards": [*shards, {"name": name, "rows": len(items)}],
        }
        write_json_atomic(self.directory / META_FILE, meta)  # the commit point
        self._meta = meta
        self._embeddings = np.concatenate([self.embeddings, vectors]) if self._embeddings is not None else None
        self._items = [*self._items, *items] if self._items is not None else None

    @staticmethod
    def _remove_unlisted(folder: Path, listed: set[str]) -> None:
        """Files left by an add that never committed."""
        for path in folder.iterdir():
            if path.name.split(".")[0] not in listed:  # temporary files start with "." and never match
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------ searching

    def search(self, query: np.ndarray, top_k: int = 5) -> list[Hit]:
        """The ``top_k`` items most similar (cosine) to the ``(dim,)`` query, best first."""
        vector = np.asarray(query, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.dim:
            raise MedlensError(
                f"a {vector.shape[0]}-dimensional query cannot search an index of dimension {self.dim}",
                str(self.directory),
            )
        if top_k < 1:
            raise MedlensError(f"top-k must be at least 1, not {top_k}")
        if len(self) == 0:
            return []
        scores = self.embeddings @ normalize_rows(vector[None])[0]
        k = min(top_k, len(scores))
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.lexsort((best, -scores[best]))]  # by score, ties by id
        return [Hit(rank, float(scores[i]), self.items[i]) for rank, i in enumerate(best, start=1)]

    def info(self) -> dict[str, Any]:
        """A summary for ``medlens search info``."""
        labels = Counter(item.label for item in self.items if item.label)
        return {
            "path": str(self.directory),
            "format_version": self._meta["format_version"],
            "model": self.model,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "count": len(self),
            "sources": len(self.sources()),
            "labels": dict(sorted(labels.items())),
            "shards": len(self._meta["shards"]),
            "created": self._meta["created"],
            "updated": self._meta["updated"],
            "medlens_version": self._meta["medlens_version"],
        }
