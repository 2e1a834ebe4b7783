"""Recovery as a job option: progress while it trains, cancel mid-run, the report entry, bad options."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from service_testing import asgi

from service.settings import Settings

pytestmark = pytest.mark.anyio
Make = Callable[..., Settings]
pytest.importorskip("torch")


async def test_recovery_progress_shows_in_the_job_and_cancel_stops_it_mid_run(settings: Make) -> None:
    async with asgi(settings()) as api:
        job = await api.job(sparsity=0.5, recover="distill", recover_steps=1_000_000, recover_time=600)
        seen = await api.wait(job["id"], lambda j: j["stage"] == "recover" and j["progress"] > 0.8, timeout=180)
        assert seen["status"] == "running" and seen["progress"] < 0.95
        pid = api.runtime.store.get(job["id"]).worker_pid  # type: ignore[union-attr]
        assert pid is not None
        response = await api.client.delete(f"/v1/jobs/{job['id']}")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_recovery_job_reports_what_it_did(settings: Make) -> None:
    async with asgi(settings()) as api:
        done = await api.wait((await api.job(sparsity=0.5, recover="distill", recover_steps=25))["id"], timeout=180)
        assert done["status"] == "succeeded", done["error"]
        report = (await api.client.get(f"/v1/jobs/{done['id']}/report")).json()
        rec = report["recovery"]
        assert rec["method"] == "distill" and rec["steps"] == 25 and rec["inputs"] == "synthetic:mixed"
        assert rec["held_out"]["after"]["loss"] <= rec["held_out"]["before"]["loss"]
        assert report["timings_s"]["recover"] > 0


async def test_the_server_bounds_a_jobs_training_time(settings: Make) -> None:
    """A client cannot lift the job timeout by asking for a long recovery: training stops with a result first."""
    async with asgi(settings(job_timeout_s=30.0)) as api:
        more = await api.submit(sparsity=0.5, recover="distill", recover_time=10_000)
        assert more.status_code == 422 and "limit of 15.0 (0.5 of GRAPHPRUNE_JOB_TIMEOUT_S)" in more.json()["detail"]
        asked = await api.job(sparsity=0.5, recover="distill", recover_steps=1_000_000)
        less = await api.job(sparsity=0.5, recover="distill", recover_steps=1_000_000, recover_time=1)
        assert [j["options"]["recover_time"] for j in (asked, less)] == [15.0, 1.0]
        assert (await api.client.delete(f"/v1/jobs/{less['id']}")).status_code == 200
        done = await api.wait(asked["id"], timeout=180)
        assert done["status"] == "succeeded", done["error"]
        rec = (await api.client.get(f"/v1/jobs/{asked['id']}/report")).json()["recovery"]
        assert rec["stopped"] == "time" and rec["steps"] < 1_000_000


async def test_bad_recovery_options_are_refused_at_submit(settings: Make) -> None:
    async with asgi(settings()) as api:
        for bad in ({"recover": "finetune"}, {"recover_steps": -5}, {"recover_time": -1}):
            response = await api.submit(**bad)
            assert response.status_code == 422, response.text
            assert next(iter(bad)) in response.json()["detail"]
