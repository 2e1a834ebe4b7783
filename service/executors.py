"""Who runs queued jobs. The API only talks to the `Executor` protocol, so a distributed engine
can replace `LocalExecutor` (one spawned process per job on this machine) without touching routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from typing import Protocol

from graphprune.errors import UsageError
from service import worker
from service.artifacts import Artifacts
from service.jobs import Job, JobError, JobStore, Status
from service.settings import Settings

log = logging.getLogger("graphprune.service")
_POLL_S = 2.0  # also look for queued jobs this often (e.g. ones recovered after a restart)


class Executor(Protocol):
    async def start(self) -> None:
        """Begin running queued jobs from the store."""

    def notify(self) -> None:
        """A job was queued; the executor decides when it runs."""

    async def stop_job(self, job_id: str) -> None:
        """The job was cancelled in the store: stop its worker and return once it is gone."""

    async def shutdown(self, grace_s: float) -> None:
        """Let running jobs finish for `grace_s`, then stop them and hand them back to the queue."""

    @property
    def running(self) -> int:
        """Jobs running now (for readiness and metrics)."""
        ...

    def unavailable(self) -> str | None:
        """Why jobs cannot run now (for /readyz), or None."""
        ...


Finished = Callable[[Job], None]


def make_executor(settings: Settings, store: JobStore, artifacts: Artifacts, on_finish: Finished) -> Executor:
    if settings.executor == "local":
        return LocalExecutor(settings, store, artifacts, on_finish)
    if settings.executor == "ray":
        from service.ray_executor import RayExecutor  # imports executors: only now, and Ray only inside it

        return RayExecutor(settings, store, artifacts, on_finish)
    raise UsageError(f"unknown executor {settings.executor!r} (GRAPHPRUNE_EXECUTOR); available: local, ray")


def timeout_error(settings: Settings) -> JobError:
    return JobError("Timeout", f"the job ran longer than {settings.job_timeout_s:g} s and was stopped; "
                               "raise GRAPHPRUNE_JOB_TIMEOUT_S for larger models")


class PoolExecutor:
    """Claims queued jobs while fewer than `max_concurrent_jobs` run and runs each attempt as an asyncio
    task. Subclasses say how an attempt runs (`_attempt`, which records a failure it can explain) and how
    it is stopped (`_kill`); dispatch, cancel, shutdown and the cleanup after a job are the same for all.
    """

    def __init__(self, settings: Settings, store: JobStore, artifacts: Artifacts, on_finish: Finished) -> None:
        self._settings = settings
        self._store = store
        self._artifacts = artifacts
        self._on_finish = on_finish
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None

    @property
    def running(self) -> int:
        return len(self._tasks)

    def unavailable(self) -> str | None:
        if self._dispatcher is not None and self._dispatcher.done():
            return "the job dispatcher has stopped; see the server log"
        return None

    async def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch(), name="graphprune-dispatcher")

    def notify(self) -> None:
        self._wake.set()

    async def stop_job(self, job_id: str) -> None:
        self._kill(job_id)
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.shield(task)

    async def shutdown(self, grace_s: float) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=grace_s)
        for job_id in list(self._tasks):
            job = self._store.get(job_id)
            if job is not None and self._store.requeue(job_id, job.attempts):
                log.info("job %s re-queued: the server is shutting down", job_id)
            self._kill(job_id)
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def _attempt(self, job: Job) -> None:
        """Run one attempt of `job` to its end, recording a failure the worker could not record."""
        raise NotImplementedError

    def _kill(self, job_id: str) -> None:
        """Stop the job's worker, if it has one now; `_attempt` then records the outcome and returns."""
        raise NotImplementedError

    async def _dispatch(self) -> None:
        while True:
            try:
                while len(self._tasks) < self._settings.max_concurrent_jobs:
                    job = self._store.claim_next()
                    if job is None:
                        break
                    self._tasks[job.id] = asyncio.create_task(self._run(job), name=f"graphprune-job-{job.id}")
            except Exception:  # e.g. the database stayed locked: try again on the next wake-up
                log.exception("could not start queued jobs")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _POLL_S)
            self._wake.clear()

    async def _run(self, job: Job) -> None:
        try:
            await self._attempt(job)
        except Exception:  # a failure to start the worker must not leave the job running forever
            log.exception("job %s: could not run its worker", job.id)
            self._store.fail(job.id, job.attempts, JobError("InternalError", "the worker could not start"))
        finally:
            self._tasks.pop(job.id, None)
            self._wake.set()
        final = self._store.get(job.id)
        if final is not None:
            if final.status != Status.SUCCEEDED:
                self._artifacts.remove_outputs(job.id)
            if final.status.terminal:
                self._artifacts.input(job.id).unlink(missing_ok=True)
                self._on_finish(final)


class LocalExecutor(PoolExecutor):
    """One worker process per job, a fresh interpreter under the job limits.

    Workers are started as `python -m service.worker SPEC` rather than through multiprocessing, so
    nothing of the server process (threads, sockets, its __main__ module) reaches them.
    """

    def __init__(self, settings: Settings, store: JobStore, artifacts: Artifacts, on_finish: Finished) -> None:
        super().__init__(settings, store, artifacts, on_finish)
        self._procs: dict[str, asyncio.subprocess.Process] = {}

    def _kill(self, job_id: str) -> None:
        proc = self._procs.get(job_id)
        if proc is not None:
            proc.kill()

    async def _attempt(self, job: Job) -> None:
        s = self._settings
        spec = worker.WorkerSpec(job.id, job.attempts, str(s.data_dir), s.result_ttl_s, s.job_memory_bytes,
                                 s.job_cpu_s, s.worker_stage_delay_s)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "service.worker", spec.to_json(),
                                                    stdin=asyncio.subprocess.DEVNULL)
        self._procs[job.id] = proc
        try:
            self._store.set_pid(job.id, job.attempts, proc.pid)
            timed_out = False
            try:
                await asyncio.wait_for(proc.wait(), s.job_timeout_s)
            except TimeoutError:
                timed_out = True
                proc.kill()
                await proc.wait()
            if self._store.fail(job.id, job.attempts, self._exit_error(proc.returncode, timed_out)):
                log.warning("job %s: worker exited with %s and no result", job.id, proc.returncode)
        finally:
            self._procs.pop(job.id, None)

    def _exit_error(self, exitcode: int | None, timed_out: bool) -> JobError:
        s = self._settings
        if timed_out:
            return timeout_error(s)
        if exitcode == -signal.SIGXCPU:
            return JobError("CpuLimit", f"the job used its {s.job_cpu_s} CPU seconds and was stopped; "
                                        "raise GRAPHPRUNE_JOB_CPU_S for larger models")
        if exitcode is not None and exitcode < 0:
            # the kernel's OOM killer sends SIGKILL, a failed native allocation ends in abort(): only
            # those suggest memory (a segfault or a stray signal is not helped by more of it)
            hint = (f" (out of memory? {worker.memory_message(s.job_memory_bytes)})"
                    if s.job_memory_bytes and -exitcode in (signal.SIGKILL, signal.SIGABRT) else "")
            return JobError("WorkerCrashed", f"the worker died from {signal.Signals(-exitcode).name}{hint}; the "
                                             "server log has its output")
        return JobError("WorkerCrashed", f"the worker exited with status {exitcode} and no result; the server log "
                                         "has its output")

