"""A worker process's entry point: one job, one spawned process, under hard limits.

The parent spawns it with a `WorkerSpec`; it limits itself first (address space, CPU time,
niceness, dying with the parent), then imports the library, prunes, writes the artifacts
atomically and records the outcome. Anything it cannot record (killed, crashed) the parent
records from the exit status.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from graphprune import GraphpruneError, prune
from service.artifacts import Artifacts, atomic_write
from service.jobs import JobError, JobStore, Status
from service.settings import Settings

_PR_SET_PDEATHSIG = 1
_ALLOCATION_FAILURES = ("Cannot allocate memory", "bad_alloc", "Failed to allocate", "out of memory")


@dataclass(frozen=True)
class WorkerSpec:
    job_id: str
    attempt: int
    data_dir: str
    result_ttl_s: float
    memory_bytes: int
    cpu_s: int
    stage_delay_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def memory_message(limit: int) -> str:
    return (f"the job exceeded its memory limit of {limit / 2**30:.2f} GiB of address space; "
            "raise GRAPHPRUNE_JOB_MEMORY_BYTES for larger models")


def run(spec: WorkerSpec) -> None:
    _limit(spec)
    settings = Settings(data_dir=Path(spec.data_dir))
    store = JobStore(settings.db_path, spec.result_ttl_s)
    files = Artifacts(settings.data_dir)
    job = store.get(spec.job_id)
    if job is None or job.status != Status.RUNNING or job.attempts != spec.attempt:
        store.close()
        return  # cancelled or re-queued before this process got going

    def progress(stage: str, fraction: float) -> None:
        store.progress(spec.job_id, spec.attempt, stage, fraction)
        time.sleep(spec.stage_delay_s)

    try:
        result = prune(files.input(spec.job_id), job.options, progress=progress)
        report = result.report.to_json()
        size, digest = atomic_write(files.result(spec.job_id), result.save)
        atomic_write(files.report(spec.job_id), lambda p: p.write_text(report))
        store.succeed(spec.job_id, spec.attempt, size, digest)
    except Exception as exc:  # the process boundary: every failure becomes the job's error
        store.fail(spec.job_id, spec.attempt, _error(exc, spec))
    finally:
        store.close()


def _error(exc: Exception, spec: WorkerSpec) -> JobError:
    if spec.memory_bytes and _out_of_memory(exc):
        return JobError("MemoryLimit", memory_message(spec.memory_bytes))
    if isinstance(exc, GraphpruneError):
        return JobError(type(exc).__name__, str(exc), exc.exit_code)
    traceback.print_exc(file=sys.stderr)
    return JobError("InternalError", f"{type(exc).__name__}: {exc}")


def _out_of_memory(exc: BaseException | None) -> bool:
    """MemoryError, or native code (onnxruntime, sqlite) that failed to allocate and said so."""
    while exc is not None:
        if isinstance(exc, MemoryError) or any(m in str(exc) for m in _ALLOCATION_FAILURES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _limit(spec: WorkerSpec) -> None:
    if spec.memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (spec.memory_bytes, spec.memory_bytes))
    if spec.cpu_s:  # SIGXCPU at the soft limit kills the process; the hard limit is SIGKILL's backstop
        resource.setrlimit(resource.RLIMIT_CPU, (spec.cpu_s, spec.cpu_s + 5))
    os.nice(10)  # the API stays responsive while workers saturate the cores
    if sys.platform == "linux":  # a worker must not outlive a killed server and race the re-run
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


if __name__ == "__main__":
    run(WorkerSpec(**json.loads(sys.argv[1])))
