"""A worker process's entry point: one job, one spawned process, under hard limits.

The parent spawns it with a `WorkerSpec`; it limits itself first (address space, CPU time,
niceness, dying with the parent), then imports the library, prunes, writes the artifacts
atomically and records the outcome. Anything it cannot record (killed, crashed) the parent
records from the exit status.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from onnx import ModelProto

from graphprune import GraphpruneError, mlflow_io, prune
from graphprune.api import Progress, PruneResult, Source
from graphprune.model import model_bytes
from service.artifacts import Artifacts, atomic_write, disk_full, file_digest
from service.jobs import JobError, JobStore, Status
from service.options import REGISTER_AS, SOURCE, split
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

    try:
        result = prune_job(files.input(spec.job_id), job.options, progress, spec.stage_delay_s)
        record_success(store, files, spec.job_id, spec.attempt, result.save, result.report.to_json())
    except Exception as exc:  # the process boundary: every failure becomes the job's error
        oom = memory_message(spec.memory_bytes) if spec.memory_bytes else None
        store.fail(spec.job_id, spec.attempt, job_error(exc, oom))
    finally:
        store.close()


def prune_job(source: Source, options: dict[str, Any], progress: Progress, stage_delay_s: float) -> PruneResult:
    """`prune` as every executor runs a job; the pause after each reported stage lets tests catch a job mid-run."""

    def step(stage: str, fraction: float) -> None:
        progress(stage, fraction)
        time.sleep(stage_delay_s)

    config, mlflow_options = split(options)
    result = prune(source, config, progress=step)
    if REGISTER_AS in mlflow_options:
        register(result, source, mlflow_options)
    return result


def register(result: PruneResult, source: Source, mlflow_options: dict[str, Any]) -> None:
    """Register the result in the server's MLflow store as the job asked (its report gets the `mlflow`
    entry); the version's source tag is the MLflow URI the job pruned, else the upload's sha256."""
    origin = mlflow_options.get(SOURCE) or f"upload sha256:{_sha256(source)}"
    mlflow_io.register_result(result, name=mlflow_options[REGISTER_AS], source=origin)


def _sha256(source: Source) -> str:
    data = model_bytes(source) if isinstance(source, ModelProto) else source
    return hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else file_digest(Path(data))[1]


def record_success(store: JobStore, files: Artifacts, job_id: str, attempt: int, write_model: Callable[[Path], object],
                   report: str) -> None:
    """Write result and report atomically, then mark the attempt succeeded: no reader sees half a result."""
    size, digest = atomic_write(files.result(job_id), write_model)
    atomic_write(files.report(job_id), lambda p: p.write_text(report))
    store.succeed(job_id, attempt, size, digest)


def job_error(exc: Exception, out_of_memory: str | None) -> JobError:
    """The job's error for an exception from `prune_job`; `out_of_memory` is the message for a failed
    allocation (None: the worker has no memory limit to blame)."""
    if out_of_memory is not None and _out_of_memory(exc):
        return JobError("MemoryLimit", out_of_memory)
    if isinstance(exc, GraphpruneError):
        return JobError(type(exc).__name__, str(exc), exc.exit_code)
    if disk_full(exc):
        return JobError("DiskFull", f"the server's disk filled up while the job wrote its files ({exc}); nothing "
                                    "was kept: resubmit when space is freed (GRAPHPRUNE_MIN_FREE_BYTES)")
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
