"""The Parquet folder of ``medlens embed --format parquet`` (and ``--ray``): embeddings of a whole archive in
shards, one row per image, readable with plain pyarrow.

Layout::

    DIR/part-000000.parquet   up to ``ROWS_PER_SHARD`` rows each, in input order (study, then image)
    DIR/errors.jsonl          one line per study that failed: row, path, error, reason, stage
    DIR/embeddings.json       written last (the commit): model, fingerprint, dim, counts, the shard list

Columns (``schema(dim)``): ``row`` int64 (the study's 0-based position among the inputs), ``path`` string
(absolute), ``image`` int32 (1-based, model order), ``label`` string (null when none), ``input_sha256``
string (:func:`medlens.files.sha256_of` of the study's file or folder), ``model`` and ``fingerprint``
strings, ``vector`` fixed_size_list<float32>[dim] (unit length). The schema metadata key ``medlens`` holds
the manifest's model, fingerprint and dim as JSON. pyarrow is imported when a folder is written or read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medlens import DISCLAIMER, __version__
from medlens.errors import CorruptFileError, InputError, MedlensError, NotFoundError, OutputFolderError
from medlens.files import write_atomic, write_json_atomic, write_jsonl_atomic

FOLDER_FORMAT = "medlens-embeddings"
FORMAT_VERSION = 1
MANIFEST = "embeddings.json"
ERRORS = "errors.jsonl"
SHARD_PATTERN = "part-{:06d}.parquet"
ROWS_PER_SHARD = 8192
COLUMNS = ("row", "path", "image", "label", "input_sha256", "model", "fingerprint", "vector")


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:  # pragma: no cover - pyarrow is in the scale extra
        raise MedlensError("Parquet embeddings need pyarrow: pip install 'medlens[scale]'") from None
    return pyarrow


def schema(dim: int, meta: dict[str, Any] | None = None) -> Any:
    """The Arrow schema of a shard (``meta``: the manifest fields stored under the key ``medlens``)."""
    pa = _pyarrow()
    fields = [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("image", pa.int32(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("input_sha256", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), int(dim)), nullable=False),
    ]
    return pa.schema(fields, metadata={"medlens": json.dumps(meta or {})})


def is_embedding_folder(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


@dataclass
class ShardWriter:
    """Writes rows into shards as they come (each shard atomically), then the errors and the manifest."""

    out: Path
    model: str
    fingerprint: str
    dim: int
    rows_per_shard: int = ROWS_PER_SHARD
    shards: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    _pending: list[dict[str, Any]] = field(default_factory=list)
    _rows: int = 0
    _studies: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        prepare_out(self.out)

    @property
    def meta(self) -> dict[str, Any]:
        return {"model": self.model, "fingerprint": self.fingerprint, "dim": self.dim}

    def add(self, row: int, path: str, image: int, label: str | None, sha256: str, vector: np.ndarray) -> None:
        """One image's embedding (rows are written in the order added)."""
        self._pending.append(
            {"row": row, "path": path, "image": image, "label": label, "input_sha256": sha256, "vector": vector}
        )
        self._studies.add(row)
        if len(self._pending) >= self.rows_per_shard:
            self._flush()

    def error(self, record: dict[str, Any]) -> None:
        self.errors.append(record)

    def _flush(self) -> None:
        if not self._pending:
            return
        pa = _pyarrow()
        rows, self._pending = self._pending, []
        vectors = np.asarray([r["vector"] for r in rows], np.float32).reshape(len(rows), self.dim)
        columns = {
            "row": pa.array([r["row"] for r in rows], pa.int64()),
            "path": pa.array([r["path"] for r in rows], pa.string()),
            "image": pa.array([r["image"] for r in rows], pa.int32()),
            "label": pa.array([r["label"] for r in rows], pa.string()),
            "input_sha256": pa.array([r["input_sha256"] for r in rows], pa.string()),
            "model": pa.array([self.model] * len(rows), pa.string()),
            "fingerprint": pa.array([self.fingerprint] * len(rows), pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), self.dim),
        }
        table = pa.Table.from_pydict(columns, schema=schema(self.dim, self.meta))
        name = SHARD_PATTERN.format(len(self.shards))
        write_atomic(self.out / name, lambda handle: pa.parquet.write_table(table, handle))
        self.shards.append({"name": name, "rows": len(rows)})
        self._rows += len(rows)

    def close(self, **summary: Any) -> dict[str, Any]:
        """Write the last shard, ``errors.jsonl`` and the manifest (the commit point); returns the manifest."""
        self._flush()
        write_jsonl_atomic(self.out / ERRORS, sorted(self.errors, key=lambda e: e.get("row", -1)))
        manifest = {
            "format": FOLDER_FORMAT,
            "format_version": FORMAT_VERSION,
            **self.meta,
            "n_studies": len(self._studies),
            "n_images": self._rows,
            "n_failed": len(self.errors),
            "shards": self.shards,
            "errors": ERRORS,
            "medlens_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **summary,
            "disclaimer": DISCLAIMER,
        }
        write_json_atomic(self.out / MANIFEST, manifest)
        return manifest


def prepare_out(out: Path) -> None:
    """``out`` as an empty folder: a finished folder (manifest present) or someone else's files are refused;
    the shards and temporary files of an interrupted run (no manifest yet) are cleared."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError("is a file, not a folder for embeddings", str(out))
    if (out / MANIFEST).exists():
        raise OutputFolderError("already holds embeddings (embeddings.json); choose another --out", str(out))
    if out.is_dir():
        ours = [p for p in out.iterdir() if p.name == ERRORS or p.name.startswith(("part-", ".part-", "."))]
        others = [p.name for p in out.iterdir() if p not in ours]
        if others:
            raise OutputFolderError(
                f"holds other files ({', '.join(sorted(others)[:3])}); choose an empty folder", str(out)
            )
        for path in ours:
            if path.is_file():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


@dataclass
class EmbeddingFolder:
    """A finished Parquet folder: its manifest, and its rows a shard at a time."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> EmbeddingFolder:
        path = Path(path)
        if not path.is_dir():
            raise NotFoundError("no such embeddings folder", str(path))
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise InputError(f"not a finished `medlens embed` folder (no {MANIFEST})", str(path))
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise CorruptFileError(f"unreadable manifest ({exc})", str(manifest_path)) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FOLDER_FORMAT:
            raise CorruptFileError(f"not a {FOLDER_FORMAT} manifest", str(manifest_path))
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise MedlensError(
                f"embeddings format {manifest['format_version']} is newer than this medlens reads", str(path)
            )
        return cls(path, manifest)

    @property
    def model(self) -> str:
        return str(self.manifest["model"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def tables(self) -> Iterator[Any]:
        """Each shard as a pyarrow Table, checked against the manifest."""
        pa = _pyarrow()
        for shard in self.manifest["shards"]:
            shard_path = self.path / shard["name"]
            try:
                table = pa.parquet.read_table(shard_path)
            except (OSError, pa.ArrowException) as exc:
                raise CorruptFileError(f"unreadable Parquet shard ({exc})", str(shard_path)) from None
            missing = [c for c in COLUMNS if c not in table.column_names]
            if missing:
                raise CorruptFileError(f"shard lacks the columns {', '.join(missing)}", str(shard_path))
            vector_type = table.schema.field("vector").type
            if len(table) != shard["rows"] or getattr(vector_type, "list_size", None) != self.dim:
                raise CorruptFileError(
                    f"shard holds {len(table)} rows of {vector_type}, the manifest says {shard['rows']} of dimension "
                    f"{self.dim}",
                    str(shard_path),
                )
            fingerprints = set(table.column("fingerprint").unique().to_pylist())
            if fingerprints - {self.fingerprint}:
                raise CorruptFileError("shard holds embeddings of another model than its manifest", str(shard_path))
            yield table

    def read(self) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Every vector ``(n, dim)`` float32 and its row fields (row, path, image, label, input_sha256)."""
        vectors, rows = [np.zeros((0, self.dim), np.float32)], []
        for table in self.tables():
            flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            vectors.append(np.asarray(flat, np.float32).reshape(len(table), self.dim))
            rows.extend(table.select(["row", "path", "image", "label", "input_sha256"]).to_pylist())
        return np.concatenate(vectors), rows

    def errors(self) -> list[dict[str, Any]]:
        path = self.path / ERRORS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
