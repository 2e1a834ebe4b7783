"""Jobs from an MLflow model URI and results registered in MLflow, against a local store (SQLite + file
artifacts in tmp_path): the round trip, and every bad request answered as a 4xx problem, never a 500."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from mlflow_testing import Store, initializer_count, local_store
from service_testing import DEMO, FAST, OCTET, asgi, live_server

from graphprune.cli import main
from graphprune.demo import demo_model
from service.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
Make = Callable[..., Settings]
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def store(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Store:
    return local_store(tmp_path, tmp_path_factory, monkeypatch)


def _problem(response: Any, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    for word in words:
        assert word in response.json()["detail"], response.json()["detail"]


async def test_job_from_registry_registered_as_new_version(store: Store, settings: Make) -> None:
    source = store.register_demo("demo")
    async with asgi(settings()) as api:
        body = {"source": source, "register_as": "demo-pruned", "config": {"sparsity": 0.4}}
        response = await api.client.post("/v1/jobs", params=FAST, content=json.dumps(body), headers=JSON)
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["options"] == {"sparsity": 0.4, "latency_runs": 0, "source": source, "register_as": "demo-pruned"}
        done = await api.wait(job["id"])
        assert done["status"] == "succeeded", done["error"]
        report = (await api.client.get(f"/v1/jobs/{job['id']}/report")).json()
        result = (await api.client.get(f"/v1/jobs/{job['id']}/result")).content

        # an upload can be registered too; its source tag is the upload's sha256
        upload = await api.job(DEMO, sparsity=0.3, register_as="demo-pruned")
        assert (await api.wait(upload["id"]))["status"] == "succeeded"

    assert report["mlflow"]["model_uri"] == "models:/demo-pruned/1" and report["mlflow"]["source"] == source
    version = store.client.get_model_version("demo-pruned", "1")
    assert version.tags["graphprune.source"] == source and version.tags["graphprune.sparsity"] == "0.4"
    metrics = store.client.get_run(version.run_id).data.metrics
    assert metrics["params_after"] == report["params"]["after"] < metrics["params_before"]
    pruned = onnx.load_from_string(result)
    assert initializer_count(pruned) == report["params"]["after"] < initializer_count(demo_model())
    second = store.client.get_model_version("demo-pruned", "2")
    assert second.tags["graphprune.source"] == f"upload sha256:{upload['input_sha256']}"


async def test_bad_sources_are_4xx_problems(store: Store, settings: Make, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    source = store.register_demo("demo")
    async with asgi(settings(max_upload_bytes=len(DEMO) // 2)) as api:
        async def post(body: Any, **params: Any) -> Any:
            return await api.client.post("/v1/jobs", params=params, content=json.dumps(body), headers=JSON)

        _problem(await post({"source": "models:/nope/1"}), 422, "Registered Model with name=nope not found")
        _problem(await post({"source": "file:///etc/passwd"}), 422, "not a supported MLflow model URI")
        _problem(await post({"source": "runs:/" + "0" * 32 + "/../../etc"}), 422, "not a supported")
        _problem(await post({"sparsity": 0.3}), 422, "a JSON body names an MLflow model")
        _problem(await post(["models:/demo/1"]), 422, "must be a JSON object")
        _problem(await post({"source": source, "register_as": "a/b"}), 422, "not a usable registered model name")
        _problem(await post({"source": source, "sparsity": 2}), 422, "sparsity")
        _problem(await post({"source": source}), 413, "GRAPHPRUNE_MAX_UPLOAD_BYTES")  # listed size, not downloaded
        _problem(await api.client.post("/v1/jobs", params={"source": source}, content=DEMO, headers=OCTET), 422,
                 "send it in a JSON body")

        (tmp_path / "file").write_text("")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}")
        _problem(await post({"source": source}), 424, "cannot read models:/demo/1")

        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        _problem(await post({"source": source}), 422, "no MLflow store configured (MLFLOW_TRACKING_URI)")
        _problem(await api.submit(register_as="x"), 422, "register_as need MLflow")
        assert not (await api.client.get("/v1/jobs")).json()["items"]


def test_cli_submit_names_an_mlflow_model(store: Store, settings: Make, tmp_path: Path) -> None:
    source = store.register_demo("demo")
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    with live_server(settings()) as url:
        assert main(["submit", source, str(out), "--server", url, "--sparsity", "0.3", "--register-as", "remote",
                     "--report", str(rep), "--latency-runs", "0", "-q"]) == 0
    assert json.loads(rep.read_text())["mlflow"]["model_uri"] == "models:/remote/1" and out.is_file()
    assert store.client.get_model_version("remote", "1").tags["graphprune.source"] == source
