"""The jobs API driven in process: the contract, bad input, limits, cancel, restart, expiry, auth."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from service_testing import DEMO, OCTET, asgi

from graphprune.config import PruneConfig
from graphprune.demo import demo_model
from service import options
from service.jobs import JobStore
from service.settings import Settings

pytestmark = pytest.mark.anyio
Make = Callable[..., Settings]


def _problem(response: Any, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"]
    for word in words:
        assert word in body["detail"], body["detail"]


async def test_upload_poll_download_delete(settings: Make) -> None:
    async with asgi(settings()) as api:
        response = await api.submit(sparsity=0.4)
        assert response.status_code == 202
        job = response.json()
        assert response.headers["location"] == f"/v1/jobs/{job['id']}" and int(response.headers["retry-after"]) > 0
        assert job["status"] == "queued" and job["options"] == {"sparsity": 0.4, "latency_runs": 0}
        assert job["input_sha256"] == hashlib.sha256(DEMO).hexdigest()

        done = await api.wait(job["id"])
        assert done["status"] == "succeeded", done["error"]
        assert (done["stage"], done["progress"], done["attempts"]) == ("done", 1.0, 1)

        result = await api.client.get(f"/v1/jobs/{job['id']}/result")
        assert result.status_code == 200 and result.headers["content-type"] == "application/octet-stream"
        assert result.headers["etag"] == f'"{hashlib.sha256(result.content).hexdigest()}"'
        assert result.headers["etag"] == f'"{done["result_sha256"]}"' and len(result.content) == done["result_bytes"]
        model = onnx.load_from_string(result.content)
        onnx.checker.check_model(model, full_check=True)
        y = ort.InferenceSession(result.content).run(None, {"input": np.zeros((2, 3, 16, 16), np.float32)})[0]
        assert y.shape == (2, 10)
        cached = await api.client.get(f"/v1/jobs/{job['id']}/result", headers={"If-None-Match": result.headers["etag"]})
        assert cached.status_code == 304

        report = (await api.client.get(f"/v1/jobs/{job['id']}/report")).json()
        assert report["config"]["sparsity"] == 0.4 and report["groups"]["pruned"] > 0
        assert report["params"]["after"] < report["params"]["before"]
        page = await api.client.get(f"/v1/jobs/{job['id']}/report", headers={"Accept": "text/html"})
        assert page.headers["content-type"].startswith("text/html")
        assert f"{report['params']['after']:,}" in page.text and "<svg" in page.text
        forced = await api.client.get(f"/v1/jobs/{job['id']}/report", params={"format": "json"},
                                      headers={"Accept": "text/html"})
        assert forced.json() == report
        assert "<svg" in (await api.client.get(f"/v1/jobs/{job['id']}/report", params={"format": "html"})).text
        head = await api.client.head(f"/v1/jobs/{job['id']}/result")
        assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == result.headers["etag"]
        assert int(head.headers["content-length"]) == done["result_bytes"]

        listing = (await api.client.get("/v1/jobs")).json()
        assert [j["id"] for j in listing["items"]] == [job["id"]] and listing["next_cursor"] is None
        while api.runtime.executor.running:  # the worker wrote its result; the server reaps it a moment later
            await asyncio.sleep(0.02)
        metrics = (await api.client.get("/metrics")).text
        assert 'graphprune_jobs_finished_total{status="succeeded"} 1.0' in metrics
        assert 'graphprune_jobs{status="succeeded"} 1.0' in metrics

        assert (await api.client.delete(f"/v1/jobs/{job['id']}")).status_code == 204
        _problem(await api.client.get(f"/v1/jobs/{job['id']}"), 404, job["id"])
        _problem(await api.client.get(f"/v1/jobs/{job['id']}/result"), 404)
        assert not api.runtime.artifacts.dir(job["id"]).exists()


async def test_multipart_form_with_options(settings: Make) -> None:
    async with asgi(settings()) as api:
        response = await api.client.post(
            "/v1/jobs?seed=3", files={"model": ("demo.onnx", DEMO, "application/octet-stream")},
            data={"config": json.dumps({"sparsity": 0.5, "exclude": ["fc1"]}), "target": "params"})
        assert response.status_code == 202, response.text
        assert response.json()["options"] == {"sparsity": 0.5, "exclude": ["fc1"], "target": "params", "seed": 3}
        assert (await api.client.delete(response.headers["location"])).json()["status"] == "cancelled"


def _truncated() -> bytes:
    return DEMO[: len(DEMO) // 2]


def _no_graph() -> bytes:
    model = demo_model()
    model.ClearField("graph")
    return model.SerializeToString()


@pytest.mark.parametrize(("body", "headers", "status", "words"), [
    (b"", OCTET, 400, ["empty"]),
    (b"GIF89a\x01\x00 definitely not protobuf" * 50, OCTET, 400, ["not an ONNX model"]),
    (_truncated(), OCTET, 400, ["truncated"]),
    (_no_graph(), OCTET, 400, ["no graph"]),
    (DEMO, {"Content-Type": "text/plain"}, 415, ["application/octet-stream", "application/json"]),
    (DEMO, {"Content-Type": "application/json"}, 413, ["a JSON body is limited"]),  # JSON names an MLflow model
    (DEMO, {"Content-Type": ""}, 415, ["none"]),
    (DEMO * 3, OCTET, 413, ["GRAPHPRUNE_MAX_UPLOAD_BYTES"]),
])
async def test_bad_bodies_are_4xx(settings: Make, body: bytes, headers: dict[str, str], status: int,
                                  words: list[str]) -> None:
    async with asgi(settings(max_upload_bytes=2 * len(DEMO))) as api:
        _problem(await api.submit(body, headers), status, *words)
        assert (await api.client.get("/v1/jobs")).json()["items"] == []
        assert list(api.runtime.artifacts.uploads.iterdir()) == []


async def test_oversize_chunked_and_multipart(settings: Make) -> None:
    async with asgi(settings(max_upload_bytes=len(DEMO) - 1)) as api:
        async def chunks() -> Any:
            for i in range(0, len(DEMO), 4096):
                yield DEMO[i:i + 4096]

        # no Content-Length: the cap is enforced while streaming
        _problem(await api.client.post("/v1/jobs", content=chunks(), headers=OCTET), 413)
        _problem(await api.client.post("/v1/jobs", files={"model": ("m.onnx", DEMO)}), 413)
        _problem(await api.client.post("/v1/jobs", files={"weights": ("m.onnx", b"x")}), 422, "'model'")
        assert list(api.runtime.artifacts.uploads.iterdir()) == []


@pytest.mark.parametrize(("params", "words"), [
    ({"sparsity": 1.5}, ["sparsity", "[0, 1)"]),
    ({"sparsity": "lots"}, ["sparsity", "number"]),
    ({"target": "speed"}, ["target"]),
    ({"criterion": "vibes"}, ["criterion", "vibes"]),
    ({"pruning_factor": 2, "foo": 1}, ["unknown option(s): foo, pruning_factor"]),
    ({"config": "{not json"}, ["config", "JSON"]),
    ({"config": "[1, 2]"}, ["config", "object"]),
    ({"config": json.dumps({"round_to": 0})}, ["round_to"]),
    ({"input_shapes": "input=1,3"}, ["input_shapes", "JSON"]),
    ({"validate": "perhaps"}, ["validate", "boolean"]),
    ({"sparsity": ["0.1", "0.2"]}, ["sparsity", "2 times"]),
    ({"calibration": "/etc/passwd"}, ["calibration", "server"]),
    ({"seed": -1}, ["seed", "[0, 2**63)"]),  # used to be accepted, then failed the job with a ValueError
    ({"input_shapes": json.dumps({"input": [0, 3, 16, 16]})}, ["input_shapes", ">= 1"]),
    ({"max_model_bytes": 0}, ["max_model_bytes"]),
])
async def test_bad_options_are_422_before_upload(settings: Make, params: dict[str, Any], words: list[str]) -> None:
    async with asgi(settings()) as api:
        _problem(await api.submit(**params), 422, *words)
        assert (await api.client.get("/v1/jobs")).json()["items"] == []


async def test_clients_cannot_lift_the_servers_limits(settings: Make) -> None:
    """max_model_bytes=1e15 used to switch the model-bomb budget off; samples and latency runs were unbounded."""
    async with asgi(settings(max_samples=64, max_latency_runs=3, max_obs_memory=1 << 30)) as api:
        for params, words in (({"max_model_bytes": 10**15}, ["max_model_bytes", "GRAPHPRUNE_MAX_MODEL_BYTES"]),
                              ({"samples": 65}, ["samples 65", "limit of 64", "GRAPHPRUNE_MAX_SAMPLES"]),
                              ({"latency_runs": 4}, ["latency_runs", "GRAPHPRUNE_MAX_LATENCY_RUNS"]),
                              ({"obs_memory": 2 << 30}, ["obs_memory", "GRAPHPRUNE_MAX_OBS_MEMORY"]),
                              ({"input_shapes": json.dumps({"input": [1, 3, 4096, 4096]})},
                               ["50,331,648 elements", "GRAPHPRUNE_MAX_INPUT_VALUES"])):
            _problem(await api.submit(**params), 422, *words)
        assert (await api.client.get("/v1/jobs")).json()["items"] == []
    capped = settings(max_samples=64)
    assert options.capped({"samples": 32}, capped)["samples"] == 32
    assert options.capped({}, capped)["samples"] == 64  # unset: the cap, being under the default 128
    # unasked, the OBS statistics take the library's budget (40% of the memory available), asked, up to the cap
    assert "obs_memory" not in options.capped({}, capped)
    assert options.capped({"obs_memory": 1 << 20}, capped)["obs_memory"] == 1 << 20


async def test_options_follow_prune_config(settings: Make) -> None:
    """`compensate` (issue 5) is accepted because PruneConfig has it, with its own validation."""
    if "compensate" not in PruneConfig.__dataclass_fields__:
        pytest.skip("PruneConfig has no compensate option yet")
    async with asgi(settings()) as api:
        _problem(await api.submit(compensate="magic"), 422, "compensate")
        job = await api.job(compensate="none", sparsity=0.2)
        assert job["options"]["compensate"] == "none"
        await api.client.delete(f"/v1/jobs/{job['id']}")


async def test_idempotency_key(settings: Make) -> None:
    async with asgi(settings()) as api:
        key = {**OCTET, "Idempotency-Key": "build-42"}
        first, again = await api.submit(headers=key), await api.submit(headers=key)
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        _problem(await api.submit(headers=key, sparsity=0.6), 409, "build-42")
        assert len((await api.client.get("/v1/jobs")).json()["items"]) == 1
        await api.client.delete(first.headers["location"])


def _escaping_model() -> bytes:
    """Valid protobuf whose weight points outside its folder: a hostile model, refused by the library."""
    model = demo_model()
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../../../../../etc/passwd")
    return model.SerializeToString()


async def test_hostile_model_fails_the_job_not_the_server(settings: Make) -> None:
    async with asgi(settings()) as api:
        job = await api.wait((await api.job(_escaping_model()))["id"])
        assert job["status"] == "failed"
        assert job["error"]["kind"] == "InvalidModelError" and job["error"]["exit_code"] == 3
        assert "/etc/passwd" in job["error"]["message"]
        _problem(await api.client.get(f"/v1/jobs/{job['id']}/result"), 409, "InvalidModelError")


async def test_memory_limit_stops_a_job(settings: Make) -> None:
    """Batch 20000 needs ~1.3 GB of activations: the worker's address-space limit stops it."""
    async with asgi(settings(job_memory_bytes=10**9)) as api:
        shapes = json.dumps({"input": [20000, 3, 16, 16]})
        job = await api.wait((await api.job(input_shapes=shapes))["id"])
        assert job["status"] == "failed" and job["error"]["kind"] == "MemoryLimit", job["error"]
        assert "GRAPHPRUNE_JOB_MEMORY_BYTES" in job["error"]["message"]


async def test_cancel_kills_the_running_worker(settings: Make) -> None:
    async with asgi(settings(worker_stage_delay_s=60)) as api:
        job = await api.job()
        running = await api.wait(job["id"], lambda j: j["stage"] == "analyze")  # inside graphprune.prune
        pid = api.runtime.store.get(job["id"]).worker_pid  # type: ignore[union-attr]
        assert pid is not None and running["status"] == "running"
        response = await api.client.delete(f"/v1/jobs/{job['id']}")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone and reaped before DELETE answered
        assert api.runtime.executor.running == 0
        _problem(await api.client.get(f"/v1/jobs/{job['id']}/result"), 409, "cancelled")
        assert not api.runtime.artifacts.input(job["id"]).exists()
        assert (await api.client.delete(f"/v1/jobs/{job['id']}")).status_code == 204


async def test_timeout(settings: Make) -> None:
    async with asgi(settings(worker_stage_delay_s=60, job_timeout_s=1)) as api:
        job = await api.wait((await api.job())["id"])
        assert job["status"] == "failed" and job["error"]["kind"] == "Timeout"
        assert "GRAPHPRUNE_JOB_TIMEOUT_S" in job["error"]["message"]


async def test_queue_limit_is_429_and_closing_is_503(settings: Make) -> None:
    async with asgi(settings(worker_stage_delay_s=60, max_concurrent_jobs=1, queue_limit=1)) as api:
        first = await api.job()
        await api.wait(first["id"], lambda j: j["status"] == "running")
        second = await api.job()
        full = await api.submit()
        _problem(full, 429, "queue is full")
        assert int(full.headers["retry-after"]) > 0
        assert (await api.client.delete(f"/v1/jobs/{second['id']}")).json()["status"] == "cancelled"
        assert (await api.client.delete(f"/v1/jobs/{first['id']}")).json()["status"] == "cancelled"
        api.runtime.closing = True
        _problem(await api.submit(), 503, "shutting down")
        _problem(await api.client.get("/readyz"), 503)


async def test_restart_mid_queue_loses_no_job(settings: Make) -> None:
    async with asgi(settings(worker_stage_delay_s=60, max_concurrent_jobs=1)) as api:
        ids = [(await api.job())["id"] for _ in range(2)]
        await api.wait(ids[0], lambda j: j["status"] == "running" and j["stage"] != "starting")
        pid = api.runtime.store.get(ids[0]).worker_pid  # type: ignore[union-attr]
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # shutdown stopped the worker and handed its job back to the queue
    async with asgi(settings()) as api:
        jobs = [await api.wait(i) for i in ids]
        assert [j["status"] for j in jobs] == ["succeeded"] * 2
        assert [j["attempts"] for j in jobs] == [1, 1]  # a shutdown does not use up an attempt
        page = (await api.client.get("/v1/jobs", params={"limit": 1})).json()
        assert [j["id"] for j in page["items"]] == ids[1:]
        rest = (await api.client.get("/v1/jobs", params={"limit": 1, "cursor": page["next_cursor"]})).json()
        assert [j["id"] for j in rest["items"]] == ids[:1] and rest["next_cursor"] is None
        assert (await api.client.get("/v1/jobs", params={"status": "failed"})).json()["items"] == []


async def test_crashed_server_fails_jobs_out_of_attempts(settings: Make) -> None:
    s = settings(max_attempts=1)
    s.data_dir.mkdir(parents=True)
    store = JobStore(s.db_path, s.result_ttl_s)
    store.create("a" * 32, {}, 1, "0" * 64)
    assert store.claim_next() is not None  # "running" when the server died
    store.close()
    async with asgi(s) as api:
        job = (await api.client.get(f"/v1/jobs/{'a' * 32}")).json()
        assert job["status"] == "failed" and job["error"]["kind"] == "Interrupted"


async def test_results_expire_with_410(settings: Make) -> None:
    async with asgi(settings(result_ttl_s=1)) as api:
        job = await api.wait((await api.job())["id"])
        assert job["status"] == "succeeded"
        await asyncio.sleep(1.1)
        _problem(await api.client.get(f"/v1/jobs/{job['id']}/result"), 410, "expired")
        _problem(await api.client.get(f"/v1/jobs/{job['id']}/report"), 410)
        api.runtime.purge_expired()  # the background cleaner may have been first: either way it is gone
        assert not api.runtime.artifacts.dir(job["id"]).exists()
        assert api.runtime.purge_expired() == 0


async def test_bearer_token(settings: Make) -> None:
    async with asgi(settings(api_token="s3cret")) as api:
        _problem(await api.client.get("/v1/jobs"), 401, "Bearer")
        bad = await api.client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
        _problem(bad, 401)
        assert bad.headers["www-authenticate"] == "Bearer"
        _problem(await api.submit(), 401)
        assert (await api.client.get("/v1/jobs", headers={"Authorization": "Bearer s3cret"})).status_code == 200
        assert (await api.client.get("/readyz")).status_code == 200


async def test_operations_endpoints(settings: Make) -> None:
    async with asgi(settings()) as api:
        for path in ("/livez", "/v2/health/live"):
            assert (await api.client.get(path)).json() == {"status": "live"}
        for path in ("/readyz", "/v2/health/ready"):
            assert (await api.client.get(path)).json() == {"status": "ready", "queued": 0, "running": 0}
        metrics = await api.client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain") and "graphprune_jobs" in metrics.text
        spec = (await api.client.get("/openapi.json")).json()
        params = {p["name"] for p in spec["paths"]["/v1/jobs"]["post"]["parameters"]}
        assert {"sparsity", "target", "criterion", "config"} <= params and "calibration" not in params
        for docs, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
            html = (await api.client.get(docs)).text
            assert f"/static/docs/{asset}" in html and "cdn" not in html.lower()  # offline: nothing from a CDN
            served = await api.client.get(f"/static/docs/{asset}")
            assert served.status_code == 200 and len(served.content) > 100_000
        assert spec["paths"]["/v1/jobs"]["get"]["responses"]["422"]["content"] == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/ProblemBody"}}}
        assert "HTTPValidationError" not in spec["components"]["schemas"]
        index = (await api.client.get("/")).text
        assert 'id="drop"' in index and 'data-option="sparsity"' in index and "<option>distill</option>" in index
        _problem(await api.client.get("/v1/nothing-here"), 404)
        _problem(await api.client.put("/v1/jobs"), 405)
        _problem(await api.client.get("/v1/jobs", params={"limit": 0}), 422, "limit")
