"""What one running server holds: settings, store, artifacts, executor, metrics.

`start` recovers after a crash (interrupted jobs re-queued or failed, stray files swept) and
starts the executor and the janitor that deletes expired results; `stop` drains. One server per
data directory, enforced with a lock file, because recovery re-queues every "running" job.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import IO

from graphprune.errors import UsageError
from graphprune.weights import sweep_scratch
from service.artifacts import Artifacts, disk_full
from service.executors import Executor, make_executor
from service.jobs import DuplicateKeyError, Job, JobStore, Status
from service.metrics import Metrics
from service.problems import Problem
from service.settings import Settings
from service.upload import Upload

log = logging.getLogger("graphprune.service")
QUEUE_FULL_RETRY_S = 10
DISK_FULL_RETRY_S = 60


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics, lock: IO[bytes]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.closing = False
        self._admitting = 0  # submissions past admission whose job is not in the store yet
        self._lock = lock
        self.store = JobStore(settings.db_path, settings.result_ttl_s)
        self.artifacts = Artifacts(settings.data_dir)
        self.executor: Executor = make_executor(settings, self.store, self.artifacts, metrics.job_finished)
        self._janitor: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> Runtime:
        rt = cls(settings, metrics, _lock_data_dir(settings))
        requeued, failed = rt.store.recover(settings.max_attempts)
        if requeued or failed:
            log.warning("recovered after a restart: %d job(s) re-queued, %d failed", requeued, failed)
        rt.artifacts.sweep(rt.store.ids())
        sweep_scratch()
        metrics.watch(rt.store)
        await rt.executor.start()
        rt._janitor = asyncio.create_task(rt._purge_forever(), name="graphprune-janitor")
        return rt

    async def stop(self) -> None:
        self.closing = True
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        await self.executor.shutdown(self.settings.shutdown_grace_s)
        self.store.close()
        self._lock.close()

    @contextlib.contextmanager
    def admission(self, declared_bytes: int = 0) -> Iterator[None]:
        """Hold a queue slot while a submission's body is read: queued jobs plus the submissions being
        admitted stay within GRAPHPRUNE_QUEUE_LIMIT however many arrive at once (the check and the
        reservation run on the event loop with no await between them, and one server owns the data
        directory), and the disk keeps GRAPHPRUNE_MIN_FREE_BYTES free after the declared body."""
        if self.closing:
            raise Problem(503, "the server is shutting down; retry on its successor", headers={"Retry-After": "5"})
        queued = self.store.counts()[Status.QUEUED] + self._admitting
        if queued >= self.settings.queue_limit:
            raise Problem(429, f"the queue is full ({queued} jobs waiting or arriving, GRAPHPRUNE_QUEUE_LIMIT); "
                               "retry later", headers={"Retry-After": str(QUEUE_FULL_RETRY_S)})
        if (short := self.disk_shortfall(declared_bytes)) is not None:
            raise Problem(507, short, headers={"Retry-After": str(DISK_FULL_RETRY_S)})
        self._admitting += 1
        try:
            yield
        except OSError as exc:
            if disk_full(exc):
                raise Problem(507, f"the server's disk filled up while storing the model ({exc.strerror}); "
                                   "nothing was kept, retry later", headers={"Retry-After": str(DISK_FULL_RETRY_S)}
                              ) from None
            raise
        finally:
            self._admitting -= 1

    def disk_shortfall(self, need: int = 0) -> str | None:
        """Why the data directory cannot take `need` more bytes and keep its reserve, or None."""
        free = shutil.disk_usage(self.settings.data_dir).free
        keep = self.settings.min_free_bytes
        if free - need >= keep:
            return None
        want = f"{need:,} bytes for this model and " if need else ""
        return (f"the data directory's disk has {free:,} bytes free; the server needs {want}keeps "
                f"{keep:,} free (GRAPHPRUNE_MIN_FREE_BYTES): retry later, or free space there")

    def accept(self, upload: Upload, options: dict[str, object], idempotency_key: str | None) -> Job:
        """Record a job for a stored upload; a replayed Idempotency-Key returns the first job."""
        job_id = uuid.uuid4().hex
        self.artifacts.dir(job_id).mkdir()
        os.replace(upload.path, self.artifacts.input(job_id))
        try:
            job = self.store.create(job_id, options, upload.size, upload.sha256, idempotency_key)
        except DuplicateKeyError as dup:
            self.artifacts.remove(job_id)
            if (dup.job.input_sha256, dup.job.options) != (upload.sha256, options):
                raise Problem(409, f"Idempotency-Key {idempotency_key!r} was used for job {dup.job.id} with a "
                                   "different model or options; use a new key") from None
            return dup.job
        self.metrics.submitted.inc()
        self.executor.notify()
        return job

    async def cancel_or_delete(self, job_id: str) -> Job | None:
        """Cancel a queued/running job (its worker is stopped before this returns) → the job;
        delete a finished one → None."""
        previous = self.store.cancel(job_id)
        if previous is None:
            raise Problem(404, f"no job {job_id!r}")
        if previous == Status.RUNNING:
            await self.executor.stop_job(job_id)
        elif previous.terminal:
            self.store.delete(job_id)
            self.artifacts.remove(job_id)
            return None
        job = self.store.get(job_id)
        assert job is not None
        if previous == Status.QUEUED:
            self.artifacts.remove(job_id)
            self.metrics.job_finished(job)
        return job

    def purge_expired(self) -> int:
        """Delete expired results, and the scratch weights of workers that were killed."""
        for folder in sweep_scratch():
            log.warning("removed %s: scratch weights of a worker that was killed", folder)
        expired = self.store.expired(time.time())
        for job_id in expired:
            self.artifacts.remove(job_id)
            self.store.mark_purged(job_id)
        return len(expired)

    async def _purge_forever(self) -> None:
        interval = max(1.0, min(60.0, self.settings.result_ttl_s / 2))
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.purge_expired)
            except Exception:  # keep the janitor alive through a transient disk or lock error
                log.exception("could not delete expired results")


def _lock_data_dir(settings: Settings) -> IO[bytes]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    lock = (settings.data_dir / "server.lock").open("wb")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UsageError(f"another graphprune server is using {settings.data_dir}; "
                         "stop it or set GRAPHPRUNE_DATA_DIR to another folder") from None
    return lock
