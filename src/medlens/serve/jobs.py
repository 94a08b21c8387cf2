"""Jobs: long runs submitted, polled and cancelled, kept in SQLite (WAL) under the data dir so that a
restarted server still answers for finished jobs and marks the interrupted ones failed."""

from __future__ import annotations

import datetime
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")
INTERRUPTED = "interrupted: the server stopped"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    task TEXT NOT NULL,
    created TEXT NOT NULL,
    started TEXT,
    finished TEXT,
    stage TEXT NOT NULL DEFAULT '',
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT
)
"""
_COLUMNS = "id, status, task, created, started, finished, stage, done, total"


def now() -> str:
    """The current UTC time in ISO 8601."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class JobStore:
    """The jobs table; safe to use from several threads (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute(_SCHEMA)
        path.chmod(0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, *args: Any) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def mark_interrupted(self) -> int:
        """Jobs left queued or running by a server that stopped: failed, with the reason. Returns how many."""
        error = json.dumps({"error": INTERRUPTED, "type": "Interrupted"})
        cursor = self._run(
            "UPDATE jobs SET status='failed', finished=?, error=? WHERE status IN ('queued', 'running')", now(), error
        )
        return cursor.rowcount

    def create(self, job_id: str, task: str) -> None:
        self._run("INSERT INTO jobs (id, status, task, created) VALUES (?, 'queued', ?, ?)", job_id, task, now())

    def start(self, job_id: str) -> bool:
        """queued -> running; False when the job is no longer queued (cancelled meanwhile)."""
        cursor = self._run("UPDATE jobs SET status='running', started=? WHERE id=? AND status='queued'", now(), job_id)
        return cursor.rowcount == 1

    def progress(self, job_id: str, stage: str, done: int, total: int) -> None:
        self._run(
            "UPDATE jobs SET stage=?, done=?, total=? WHERE id=? AND status='running'", stage, done, total, job_id
        )

    def finish(
        self, job_id: str, status: str, result: dict[str, Any] | None = None, error: dict[str, str] | None = None
    ) -> bool:
        """Record how an active job ended; a job already cancelled keeps that status."""
        cursor = self._run(
            "UPDATE jobs SET status=?, finished=?, result=?, error=? WHERE id=? AND status IN ('queued', 'running')",
            status,
            now(),
            json.dumps(result) if result is not None else None,
            json.dumps(error) if error is not None else None,
            job_id,
        )
        return cursor.rowcount == 1

    def cancel(self, job_id: str) -> bool:
        return self.finish(job_id, "cancelled", error={"error": "cancelled", "type": "Cancelled"})

    def delete(self, job_id: str) -> bool:
        cursor = self._run("DELETE FROM jobs WHERE id=? AND status NOT IN ('queued', 'running')", job_id)
        return cursor.rowcount == 1

    def get(self, job_id: str, with_result: bool = True) -> dict[str, Any] | None:
        row = self._run(f"SELECT {_COLUMNS}, result, error FROM jobs WHERE id=?", job_id).fetchone()
        return _job(row, with_result) if row else None

    def list(self) -> list[dict[str, Any]]:
        rows = self._run(f"SELECT {_COLUMNS}, NULL, error FROM jobs ORDER BY created DESC, rowid DESC").fetchall()
        return [_job(row, with_result=False) for row in rows]


def _job(row: tuple[Any, ...], with_result: bool) -> dict[str, Any]:
    job_id, status, task, created, started, finished, stage, done, total, result, error = row
    job: dict[str, Any] = {
        "id": job_id,
        "status": status,
        "task": task,
        "created": created,
        "started": started,
        "finished": finished,
        "progress": {"stage": stage, "done": done, "total": total},
    }
    if with_result:
        job["result"] = json.loads(result) if result else None
    job["error"] = json.loads(error) if error else None
    return job
