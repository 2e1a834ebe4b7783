"""Job records and their state machine, in SQLite, so a restarted server loses no accepted job.

    queued ─► running ─► succeeded | failed | cancelled        (queued ─► cancelled too)
                 └──► queued   (re-run after an interrupted attempt)

The server and each worker process open their own store. Every change is one conditional UPDATE:
a worker's writes name its attempt and only land while that attempt is running, so a stale or
cancelled worker can never move a job back.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in (Status.QUEUED, Status.RUNNING)


@dataclass(frozen=True)
class JobError:
    """Why a job failed: `kind` is the library's exception class name or a service reason."""

    kind: str
    message: str
    exit_code: int = 1


@dataclass(frozen=True)
class Job:
    id: str
    seq: int
    status: Status
    stage: str
    progress: float
    options: dict[str, Any]
    input_bytes: int
    input_sha256: str
    attempts: int
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    result_bytes: int | None = None
    result_sha256: str | None = None
    error: JobError | None = None
    idempotency_key: str | None = None
    worker_pid: int | None = None


class DuplicateKeyError(Exception):
    """Another job was already accepted under this Idempotency-Key."""

    def __init__(self, job: Job) -> None:
        super().__init__(job.id)
        self.job = job


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    status TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    progress REAL NOT NULL DEFAULT 0,
    options TEXT NOT NULL,
    input_bytes INTEGER NOT NULL,
    input_sha256 TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER,
    result_bytes INTEGER,
    result_sha256 TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    expires_at REAL,
    purged INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs (purged, expires_at);
"""


class JobStore:
    """One SQLite connection behind a lock; every call is a short transaction."""

    def __init__(self, path: Path, result_ttl_s: float) -> None:
        self.path = path
        self.result_ttl_s = result_ttl_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an answered 202 must survive a power cut too
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ reads

    def get(self, job_id: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def page(self, limit: int, before_seq: int | None = None, status: Status | None = None) -> list[Job]:
        """Newest first; `before_seq` is the cursor of the previous page."""
        sql = "SELECT * FROM jobs WHERE seq < ?"
        args: list[Any] = [before_seq if before_seq is not None else 2**63 - 1]
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        return self._all(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit))

    def counts(self) -> dict[Status, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        found = {Status(s): n for s, n in rows}
        return {s: found.get(s, 0) for s in Status}

    def expired(self, now: float) -> list[str]:
        """Finished jobs whose artifacts outlived the TTL and are not deleted yet."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE purged = 0 AND expires_at <= ?", (now,)).fetchall()
        return [r[0] for r in rows]

    def ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM jobs")}

    # ------------------------------------------------------------------ transitions

    def create(self, job_id: str, options: dict[str, Any], input_bytes: int, input_sha256: str,
               idempotency_key: str | None = None) -> Job:
        try:
            self._write(
                "INSERT INTO jobs (id, idempotency_key, status, options, input_bytes, input_sha256, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, idempotency_key, Status.QUEUED, json.dumps(options), input_bytes, input_sha256,
                 time.time()))
        except sqlite3.IntegrityError:
            existing = self._one("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,))
            if existing is None:
                raise
            raise DuplicateKeyError(existing) from None
        job = self.get(job_id)
        assert job is not None
        return job

    def claim_next(self) -> Job | None:
        """Oldest queued job → running (a new attempt), or None."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq LIMIT 1",
                                       (Status.QUEUED,)).fetchone()
                if row is not None:
                    self._db.execute(
                        "UPDATE jobs SET status = ?, attempts = attempts + 1, started_at = ?, stage = 'starting', "
                        "progress = 0, worker_pid = NULL WHERE id = ?", (Status.RUNNING, time.time(), row[0]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None if row is None else self.get(row[0])

    def set_pid(self, job_id: str, attempt: int, pid: int) -> None:
        self._write_running("worker_pid = ?", (pid,), job_id, attempt)

    def progress(self, job_id: str, attempt: int, stage: str, fraction: float) -> bool:
        return self._write_running("stage = ?, progress = ?", (stage, fraction), job_id, attempt)

    def succeed(self, job_id: str, attempt: int, result_bytes: int, result_sha256: str) -> bool:
        return self._finish(job_id, attempt, Status.SUCCEEDED, "stage = 'done', progress = 1, result_bytes = ?, "
                            "result_sha256 = ?, error = NULL", (result_bytes, result_sha256))

    def fail(self, job_id: str, attempt: int, error: JobError) -> bool:
        return self._finish(job_id, attempt, Status.FAILED, "error = ?", (json.dumps(error.__dict__),))

    def requeue(self, job_id: str, attempt: int) -> bool:
        """Hand an attempt that the server itself stopped back to the queue; it does not count."""
        return self._write_running("status = ?, attempts = attempts - 1, stage = '', progress = 0, worker_pid = NULL",
                                   (Status.QUEUED,), job_id, attempt)

    def cancel(self, job_id: str) -> Status | None:
        """Cancel a queued or running job; returns the status it had (None: no such job)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is not None and not Status(row[0]).terminal:
                    now = time.time()
                    self._db.execute("UPDATE jobs SET status = ?, finished_at = ?, expires_at = ? WHERE id = ?",
                                     (Status.CANCELLED, now, now + self.result_ttl_s, job_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None if row is None else Status(row[0])

    def delete(self, job_id: str) -> None:
        self._write("DELETE FROM jobs WHERE id = ?", (job_id,))

    def mark_purged(self, job_id: str) -> None:
        self._write("UPDATE jobs SET purged = 1 WHERE id = ?", (job_id,))

    def recover(self, max_attempts: int) -> tuple[int, int]:
        """After a crash: re-queue interrupted jobs with attempts left, fail the rest. → (requeued, failed)."""
        error = JobError("Interrupted", f"the server stopped during each of {max_attempts} attempts; "
                                        "the model may crash or exhaust the machine")
        now = time.time()
        with self._lock:
            failed = self._db.execute(
                "UPDATE jobs SET status = ?, error = ?, finished_at = ?, expires_at = ? "
                "WHERE status = ? AND attempts >= ?",
                (Status.FAILED, json.dumps(error.__dict__), now, now + self.result_ttl_s, Status.RUNNING,
                 max_attempts)).rowcount
            requeued = self._db.execute(
                "UPDATE jobs SET status = ?, stage = '', progress = 0, worker_pid = NULL WHERE status = ?",
                (Status.QUEUED, Status.RUNNING)).rowcount
        return requeued, failed

    # ------------------------------------------------------------------ helpers

    def _finish(self, job_id: str, attempt: int, status: Status, assignments: str, args: tuple[Any, ...]) -> bool:
        now = time.time()
        return self._write_running(f"status = ?, finished_at = ?, expires_at = ?, {assignments}",
                                   (status, now, now + self.result_ttl_s, *args), job_id, attempt)

    def _write_running(self, assignments: str, args: tuple[Any, ...], job_id: str, attempt: int) -> bool:
        return self._write(f"UPDATE jobs SET {assignments} WHERE id = ? AND status = ? AND attempts = ?",
                           (*args, job_id, Status.RUNNING, attempt)) > 0

    def _write(self, sql: str, args: tuple[Any, ...]) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def _one(self, sql: str, args: tuple[Any, ...]) -> Job | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def _all(self, sql: str, args: tuple[Any, ...]) -> list[Job]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_job(r) for r in rows]


def _job(row: sqlite3.Row) -> Job:
    error = json.loads(row["error"]) if row["error"] else None
    return Job(
        id=row["id"], seq=row["seq"], status=Status(row["status"]), stage=row["stage"], progress=row["progress"],
        options=json.loads(row["options"]), input_bytes=row["input_bytes"], input_sha256=row["input_sha256"],
        attempts=row["attempts"], created_at=row["created_at"], started_at=row["started_at"],
        finished_at=row["finished_at"], expires_at=row["expires_at"], result_bytes=row["result_bytes"],
        result_sha256=row["result_sha256"], error=JobError(**error) if error else None,
        idempotency_key=row["idempotency_key"], worker_pid=row["worker_pid"],
    )
