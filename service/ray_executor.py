"""Jobs as Ray tasks (`GRAPHPRUNE_EXECUTOR=ray`): capacity beyond one machine, on the cluster that
`RAY_ADDRESS` names (`ray://head:10001`); without it, `ray.init()` joins a `ray start` cluster on this
machine or starts a local instance.

Models travel through Ray's object store (the input as a `ray.put` argument, the pruned model and
report as the return value), so Ray workers need no access to the server's data directory. Stages
come back through a `ray.util.queue.Queue` actor that the server drains into the job store. Ray is an
optional extra (`graphprune[ray]`): it is imported here only, when the executor is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from graphprune.errors import UsageError
from graphprune.model import model_bytes
from service import worker
from service.artifacts import Artifacts
from service.executors import Finished, PoolExecutor, timeout_error
from service.jobs import Job, JobError, JobStore, Status
from service.settings import Settings

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.util.queue import Queue

log = logging.getLogger("graphprune.service")
T = TypeVar("T")
INSTALL = "pip install 'graphprune[ray]'"
_GONE_WAIT_S = 30.0  # how long a force-cancelled task gets to be reported dead
RAY_MEMORY_MESSAGE = ("the job ran out of memory on its Ray worker; raise GRAPHPRUNE_JOB_MEMORY_BYTES (the memory "
                      "Ray reserves per job) or give the Ray workers more memory")


def import_ray() -> ModuleType:
    """Ray, or a UsageError that says how to get it (it is an optional extra)."""
    try:
        import ray
    except ImportError as exc:
        raise UsageError(f"GRAPHPRUNE_EXECUTOR=ray needs Ray, which is not installed ({exc}); "
                         f"install it with: {INSTALL}") from None
    return ray


@dataclass(frozen=True)
class TaskSpec:
    """What a Ray task needs besides the model: no paths, the worker may be on another machine."""

    job_id: str
    attempt: int
    options: dict[str, Any]
    stage_delay_s: float


@dataclass(frozen=True)
class Pruned:
    model: bytes
    report: str


def prune_task(model: bytes, spec: TaskSpec, stages: Queue) -> Pruned | JobError:
    """The Ray task. A library failure comes back as a value, mapped exactly as a local worker maps it;
    Ray's own exceptions mean the worker was lost (see `ray_error`)."""

    def progress(stage: str, fraction: float) -> None:
        stages.put((spec.job_id, spec.attempt, stage, fraction))

    try:
        result = worker.prune_job(model, spec.options, progress, spec.stage_delay_s)
        return Pruned(model_bytes(result.model), result.report.to_json())
    except Exception as exc:  # the task boundary: every failure becomes the job's error
        return worker.job_error(exc, RAY_MEMORY_MESSAGE)


def ray_error(exc: Exception) -> JobError:
    """The job's error when waiting for its task raised: Ray lost, killed or could not run the worker."""
    from ray import exceptions

    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, exceptions.OutOfMemoryError):
        return JobError("MemoryLimit", f"{RAY_MEMORY_MESSAGE} (Ray's memory monitor stopped it: {first})")
    if isinstance(exc, exceptions.RayTaskError):  # raised before prune_task's own handling, e.g. unpickling
        return JobError("InternalError", f"the Ray task failed: {exc.cause!r}")
    return JobError("WorkerCrashed", f"the Ray worker running the job was lost ({type(exc).__name__}: {first}); "
                                     "the Ray logs have its output")


class RayExecutor(PoolExecutor):
    """Each attempt is one Ray task reserving `ray_job_cpus` and `job_memory_bytes`; cancel, timeout and
    shutdown force-cancel it. `max_calls=1`: a fresh worker process per job, as with the local executor,
    so a job's leftovers (memory, onnxruntime threads) never reach the next one."""

    def __init__(self, settings: Settings, store: JobStore, artifacts: Artifacts, on_finish: Finished) -> None:
        super().__init__(settings, store, artifacts, on_finish)
        self._ray = import_ray()
        self._refs: dict[str, ObjectRef[Pruned | JobError]] = {}
        self._stages: Queue | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._closing = False
        self._owns_ray = False
        self._remote: Any = None
        self._reserved: tuple[float, int] = (settings.ray_job_cpus, settings.job_memory_bytes)

    async def start(self) -> None:
        ray = self._ray
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS") or None  # None: this machine's cluster, or a new one
            try:
                ray.init(address)
            except Exception as exc:  # unreachable head, version mismatch, ray:// without ray[client]...
                raise UsageError(f"could not connect to Ray at RAY_ADDRESS={address}: {exc}") from exc
            self._owns_ray = True
        from ray.util.queue import Queue

        self._reserved = cpus, memory = self._reservation()
        self._remote = ray.remote(num_cpus=cpus, max_calls=1, max_retries=0,
                                  **({"memory": memory} if memory else {}))(prune_task)
        self._stages = Queue(actor_options={"num_cpus": 0})  # may live on a head without CPUs
        self._drainer = asyncio.create_task(self._drain(self._stages), name="graphprune-ray-progress")
        await super().start()

    def unavailable(self) -> str | None:
        """The dispatcher's health, then whether the cluster answers and has a live node with CPUs."""
        if (problem := super().unavailable()) is not None:
            return problem
        try:
            cpus = self._ray.cluster_resources().get("CPU", 0.0)
        except Exception as exc:  # Ray Client raises ConnectionError and others when the head is gone
            return f"the Ray cluster does not answer (RAY_ADDRESS): {type(exc).__name__}: {exc}"
        return None if cpus > 0 else "the Ray cluster has no live node with CPUs"

    def _reservation(self) -> tuple[float, int]:
        """CPUs and memory each task reserves: the settings, clamped to the largest live node. A request
        no node can meet is never scheduled, and Ray does not say so: the default 16 GiB against a local
        Ray's 15.9 GiB of `memory` on a 24 GiB machine left jobs at "starting" forever."""
        s = self._settings
        nodes = [n.get("Resources", {}) for n in self._ray.nodes() if n.get("Alive")]
        cpus, memory = s.ray_job_cpus, s.job_memory_bytes
        most_cpus = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
        most_memory = int(max((r.get("memory", 0.0) for r in nodes), default=0.0))
        if 0 < most_cpus < cpus:
            log.warning("no Ray node has %s CPUs (GRAPHPRUNE_RAY_JOB_CPUS); jobs reserve %s", cpus, most_cpus)
            cpus = most_cpus
        if memory and 0 < most_memory < memory:
            log.warning("no Ray node has %d bytes of memory (GRAPHPRUNE_JOB_MEMORY_BYTES); jobs reserve %d",
                        memory, most_memory)
            memory = most_memory
        return cpus, memory

    async def _started(self, job: Job, ref: ObjectRef[Any]) -> bool:
        """Whether the task began (reported a stage, or ended) within GRAPHPRUNE_RAY_SCHEDULE_TIMEOUT_S."""
        loop = asyncio.get_running_loop()
        deadline, result = loop.time() + self._settings.ray_schedule_timeout_s, _watched(ref)
        while loop.time() < deadline:
            now = self._store.get(job.id)
            if now is None or now.attempts != job.attempts or now.stage != "starting":
                return True
            done, _ = await asyncio.wait([result], timeout=0.5)
            if done:
                return True
        return False

    async def shutdown(self, grace_s: float) -> None:
        await super().shutdown(grace_s)
        self._closing = True  # the drainer's pending get fails once the queue is gone, and it returns
        if self._stages is not None:
            self._stages.shutdown(force=True)
        if self._drainer is not None:
            await asyncio.wait([self._drainer], timeout=_GONE_WAIT_S)
        if self._owns_ray:
            self._ray.shutdown()

    def _kill(self, job_id: str) -> None:
        ref = self._refs.get(job_id)
        if ref is not None:
            self._ray.cancel(ref, force=True)

    async def _attempt(self, job: Job) -> None:
        s = self._settings
        path = self._artifacts.input(job.id)
        model = await asyncio.to_thread(lambda: self._ray.put(path.read_bytes()))
        now = self._store.get(job.id)
        if now is None or now.status != Status.RUNNING or now.attempts != job.attempts:
            return  # cancelled or re-queued during the upload to Ray: nothing to stop yet
        ref = self._remote.remote(model, TaskSpec(job.id, job.attempts, job.options, s.worker_stage_delay_s),
                                  self._stages)
        self._refs[job.id] = ref
        try:
            if not await self._started(job, ref):
                self._kill(job.id)
                await self._gone(ref)
                outcome = JobError("Unschedulable", (
                    f"Ray did not start the job within {s.ray_schedule_timeout_s:g} s "
                    f"(GRAPHPRUNE_RAY_SCHEDULE_TIMEOUT_S): no node had {self._reserved[0]:g} CPUs and "
                    f"{self._reserved[1]:,} bytes of memory free for it; resubmit later, add Ray nodes, or lower "
                    "GRAPHPRUNE_RAY_JOB_CPUS / GRAPHPRUNE_JOB_MEMORY_BYTES"))
            else:
                outcome = await asyncio.wait_for(_abandonable(ref), s.job_timeout_s)
        except TimeoutError:
            self._kill(job.id)
            await self._gone(ref)
            outcome = timeout_error(s)
        except Exception as exc:  # cancelled by us (the store already says so), crashed, OOM, cluster lost
            outcome = ray_error(exc)
        finally:
            self._refs.pop(job.id, None)
        if isinstance(outcome, Pruned):
            await asyncio.to_thread(worker.record_success, self._store, self._artifacts, job.id, job.attempts,
                                    lambda p: p.write_bytes(outcome.model), outcome.report)
        elif self._store.fail(job.id, job.attempts, outcome):
            log.warning("job %s failed on Ray: %s: %s", job.id, outcome.kind, outcome.message)

    async def _gone(self, ref: ObjectRef[Any]) -> None:
        """Wait until Ray reports the cancelled task over, so a stopped job frees its worker first."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_abandonable(ref), _GONE_WAIT_S)

    async def _drain(self, stages: Queue) -> None:
        """Stages reported by tasks → the job store (which ignores those of attempts no longer running).
        Never cancelled (see `_abandonable`): it returns when shutdown has removed the queue."""
        while not self._closing:
            try:
                job_id, attempt, stage, fraction = await stages.get_async()
            except Exception:  # e.g. the queue actor was lost: jobs still finish, only progress stalls
                if not self._closing:
                    log.exception("could not read job progress from Ray")
                    await asyncio.sleep(1.0)
                continue
            self._store.progress(job_id, attempt, stage, fraction)


def _watched(ref: ObjectRef[T]) -> asyncio.Future[T]:
    """`ref` as an asyncio future whose failure counts as seen (no "exception never retrieved")."""
    future = asyncio.wrap_future(ref.future())
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


def _abandonable(ref: ObjectRef[T]) -> asyncio.Future[T]:
    """An awaitable for `ref` that a timeout may give up on. Cancelling Ray's own future breaks Ray
    Client (its connection thread later fails to resolve it, InvalidStateError), so it is shielded."""
    return asyncio.shield(_watched(ref))
