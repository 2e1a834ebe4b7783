"""The Ray executor (`GRAPHPRUNE_EXECUTOR=ray`) through the HTTP API, on a local Ray instance.

Starting Ray takes several seconds, so everything that needs a cluster is one test on one instance
(pytest-xdist would otherwise start one per worker process); what needs no cluster is tested apart.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from service_testing import DEMO, asgi

from graphprune.errors import UsageError
from service.jobs import JobStore, Status
from service.settings import Settings

pytestmark = pytest.mark.anyio
Make = Callable[..., Settings]
RAY = {"executor": "ray", "job_memory_bytes": 2**28, "max_concurrent_jobs": 2}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[ModuleType]:
    """A private local Ray instance (address="local": never a cluster RAY_ADDRESS points at)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 2**20)
    try:
        yield ray
    finally:
        ray.shutdown()


async def _cpus_free(ray: ModuleType, want: float = 2.0, timeout: float = 60.0) -> None:
    """Ray gives a killed task's CPU back a moment after the task is reported dead."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) < want:
        assert time.monotonic() < deadline, f"Ray still has {ray.available_resources()} after {timeout} s"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_jobs_run_as_ray_tasks(ray_cluster: ModuleType, settings: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    async with asgi(settings(**RAY)) as api:  # a real job end to end, and a library error
        done, impossible = await asyncio.gather(
            api.wait((await api.job(sparsity=0.4))["id"]),
            api.wait((await api.job(sparsity=0.99, target="params"))["id"]))
        assert done["status"] == "succeeded", done["error"]
        result = (await api.client.get(f"/v1/jobs/{done['id']}/result")).content
        assert len(result) == done["result_bytes"] < len(DEMO)
        onnx.checker.check_model(onnx.load_from_string(result), full_check=True)
        y = ort.InferenceSession(result).run(None, {"input": np.zeros((2, 3, 16, 16), np.float32)})[0]
        assert y.shape == (2, 10)
        report = (await api.client.get(f"/v1/jobs/{done['id']}/report")).json()
        assert report["params"]["after"] < report["params"]["before"]
        assert impossible["status"] == "failed", impossible
        assert (impossible["error"]["kind"], impossible["error"]["exit_code"]) == ("TargetImpossibleError", 4)
        assert not api.runtime.artifacts.input(done["id"]).exists()
        assert (await api.client.get("/readyz")).status_code == 200

        def gone() -> None:
            raise ConnectionError("lost the head node")

        monkeypatch.setattr(ray_cluster, "cluster_resources", gone)  # /readyz sees the cluster go
        unready = await api.client.get("/readyz")
        assert unready.status_code == 503 and "Ray cluster does not answer" in unready.json()["detail"]
        monkeypatch.undo()

    slow = settings(**RAY, worker_stage_delay_s=60)
    async with asgi(slow) as api:  # progress, cancel; then a running job at shutdown goes back to the queue
        job = await api.job()
        running = await api.wait(job["id"], lambda j: j["stage"] == "analyze")
        assert running["status"] == "running" and running["progress"] == pytest.approx(0.3)
        response = await api.client.delete(f"/v1/jobs/{job['id']}")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        assert api.runtime.executor.running == 0
        await _cpus_free(ray_cluster)  # the task was really stopped
        assert not api.runtime.artifacts.input(job["id"]).exists()

        interrupted = await api.job()
        await api.wait(interrupted["id"], lambda j: j["stage"] == "analyze")
    store = JobStore(slow.db_path, slow.result_ttl_s)
    requeued = store.get(interrupted["id"])
    store.close()
    assert requeued is not None and (requeued.status, requeued.attempts) == (Status.QUEUED, 0)
    await _cpus_free(ray_cluster)

    async with asgi(settings(**RAY, worker_stage_delay_s=60, job_timeout_s=2)) as api:
        job = await api.wait((await api.job())["id"])
        assert job["status"] == "failed" and job["error"]["kind"] == "Timeout", job["error"]
        assert "GRAPHPRUNE_JOB_TIMEOUT_S" in job["error"]["message"]
    await _cpus_free(ray_cluster)

    # a reservation no node can meet (1 TiB here; the 16 GiB default against a local Ray's 15.9 GiB on a
    # 24 GiB machine) is clamped to the largest node: it used to stay "starting" forever
    async with asgi(settings(**{**RAY, "job_memory_bytes": 2**40})) as api:
        job = await api.wait((await api.job())["id"], timeout=120)
        assert job["status"] == "succeeded", job["error"]
    await _cpus_free(ray_cluster)

    # a job Ray cannot start in time (both CPUs held by another job) fails with the reason
    async with asgi(settings(**RAY, ray_job_cpus=2, worker_stage_delay_s=60, ray_schedule_timeout_s=15)) as api:
        holder = await api.job()
        await api.wait(holder["id"], lambda j: j["stage"] == "analyze")
        waiting = await api.wait((await api.job())["id"], timeout=60)
        assert waiting["status"] == "failed" and waiting["error"]["kind"] == "Unschedulable", waiting["error"]
        assert "GRAPHPRUNE_RAY_SCHEDULE_TIMEOUT_S" in waiting["error"]["message"]
        assert (await api.client.delete(f"/v1/jobs/{holder['id']}")).status_code == 200
    await _cpus_free(ray_cluster)


async def test_without_ray_startup_says_how_to_install_it(settings: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'graphprune\[ray\]'"):
        async with asgi(settings(executor="ray")):
            pass


def test_the_task_maps_failures_like_a_local_worker() -> None:
    """prune_task runs here without Ray: the stage queue is anything with `put`."""
    from service.ray_executor import Pruned, TaskSpec, prune_task

    class Stages:
        def __init__(self) -> None:
            self.items: list[Any] = []

        def put(self, item: Any) -> None:
            self.items.append(item)

    stages = Stages()
    ok = prune_task(DEMO, TaskSpec("j", 1, {"sparsity": 0.4, "latency_runs": 0}, 0.0), stages)  # type: ignore[arg-type]
    assert isinstance(ok, Pruned) and len(ok.model) < len(DEMO) and json.loads(ok.report)["config"]["sparsity"] == 0.4
    assert stages.items[0] == ("j", 1, "analyze", 0.3) and stages.items[-1] == ("j", 1, "done", 1.0)
    failed = prune_task(b"not a model", TaskSpec("j", 1, {}, 0.0), stages)  # type: ignore[arg-type]
    assert not isinstance(failed, Pruned) and (failed.kind, failed.exit_code) == ("InvalidModelError", 3)


def test_ray_failures_map_to_job_errors() -> None:
    exceptions = pytest.importorskip("ray.exceptions")
    from service.ray_executor import ray_error

    oom = ray_error(exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.\nmore"))
    assert oom.kind == "MemoryLimit" and "GRAPHPRUNE_JOB_MEMORY_BYTES" in oom.message and "\n" not in oom.message
    crashed = ray_error(exceptions.WorkerCrashedError())
    assert crashed.kind == "WorkerCrashed" and "WorkerCrashedError" in crashed.message
    assert ray_error(exceptions.NodeDiedError("node 1 died")).kind == "WorkerCrashed"
    assert ray_error(ConnectionError("lost the cluster")).kind == "WorkerCrashed"
