"""The run journal: every model output is appended (and fsync'd) to ``journal.jsonl`` the moment it exists,
with a SQLite index for lookups. A run killed at any point (even ``kill -9``) loses at most the request in
flight; rerunning the same command reuses everything journaled under the same key. A SIGINT/SIGTERM that
arrives while a line is written takes effect once it is written (:func:`medlens.interrupts.deferred`); a
line torn anyway (``kill -9``, a full disk) is dropped on the next open, with a warning in ``warnings``."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from medlens.interrupts import deferred

JOURNAL = "journal.jsonl"
INDEX = "journal.sqlite"


class Journal:
    """Append-only JSONL (the source of truth) plus a SQLite index rebuilt from it when missing or stale."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / JOURNAL
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(Path(run_dir) / INDEX)
        self._db.execute("CREATE TABLE IF NOT EXISTS outputs (key TEXT PRIMARY KEY, record TEXT NOT NULL)")
        #: what opening the journal found wrong (a torn last line), for the run's results
        self.warnings: list[str] = []
        if _drop_cut_line(self.path):
            self.warnings.append(
                f"{self.path}: its last line was cut by an interrupted write and is ignored (that output is made again)"
            )
        self._sync_index()
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def _sync_index(self) -> None:
        """Index every complete journal line (a line cut by a crash is ignored)."""
        if not self.path.exists():
            return
        known = self._db.execute("SELECT COUNT(*) FROM outputs").fetchone()[0]
        records = list(_read_lines(self.path))
        if known == len({r["key"] for r in records}):
            return
        self._db.executemany(
            "INSERT OR REPLACE INTO outputs (key, record) VALUES (?, ?)", [(r["key"], json.dumps(r)) for r in records]
        )
        self._db.commit()

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT record FROM outputs WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def add(self, record: dict[str, Any]) -> None:
        """Append, flush and fsync, then index."""
        line = json.dumps(record, ensure_ascii=False)
        with deferred():
            self._fh.write(line + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._db.execute("INSERT OR REPLACE INTO outputs (key, record) VALUES (?, ?)", (record["key"], line))
            self._db.commit()

    def close(self) -> None:
        self._fh.close()
        self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_cut_line(path: Path) -> bool:
    """A crash can leave a half-written last line: cut it off so appends start on a fresh line; True if cut."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return False
    with open(path, "r+b") as fh:
        fh.truncate(data.rfind(b"\n") + 1)
    return True


def _read_lines(path: Path):
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                return  # the last line was cut by a crash
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "key" in record:
                yield record
