"""MLflow in and out of the CLI against a local store (SQLite + file artifacts in tmp_path, no server):
prune `models:/NAME/VERSION`, register the result as a new version with metrics and tags, and the
errors a user gets for a wrong URI, an artifact without one .onnx, an unusable store, no mlflow.
The store-backed tests are `slow` (~20 s: MLflow's import, schema and first run), the rest are not."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlflow_testing import Store, initializer_count, local_store

from graphprune import mlflow_io
from graphprune.cli import main
from graphprune.demo import demo_model
from graphprune.errors import ModelTooLargeError

FAST = ["-q", "--latency-runs", "0"]


@pytest.fixture
def store(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Store:
    return local_store(tmp_path, tmp_path_factory, monkeypatch)


@pytest.mark.parametrize("uri", ["models:/resnet/3", "models:/resnet@champion", "models:/resnet/Production",
                                 "models:/m-0123abcd", "runs:/0123456789abcdef0123456789abcdef/model",
                                 "runs:/0123456789abcdef0123456789abcdef/a/b/"])
def test_supported_uris(uri: str) -> None:
    assert mlflow_io.is_model_uri(uri) and mlflow_io.check_uri(uri) == uri


@pytest.mark.parametrize("uri", ["models:/", "models:/a/b/c", "models:/../etc", "models:/a/..", "file:///etc/passwd",
                                 "s3://bucket/model", "runs:/not-a-run-id/model", "runs:/" + "0" * 32 + "/../../x",
                                 "models:/a?x=1", "runs:/" + "0" * 32 + "/a\\..\\b"])
def test_unsupported_uris(uri: str) -> None:
    with pytest.raises(mlflow_io.MlflowError, match="not a supported MLflow model URI"):
        mlflow_io.check_uri(uri)


def test_metrics_from_a_report() -> None:
    from graphprune import prune

    metrics = mlflow_io.run_metrics(prune(demo_model(), sparsity=0.3, latency_runs=1).report.to_dict())
    assert metrics["params_after"] < metrics["params_before"] and 0 < metrics["params_ratio"] < 1
    assert 0 < metrics["flops_ratio"] < 1 and metrics["latency_ms_after"] > 0 and metrics["speedup"] > 0
    assert metrics["equivalence_passed"] == 1.0 and "validation.logits.cosine" in metrics
    assert metrics["compensation_applied"] in (0.0, 1.0) and metrics["compensation_layers"] > 0
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.slow
def test_prune_from_registry_and_register_new_version(store: Store, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    source = store.register_demo("demo")
    assert source == "models:/demo/1"
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    rc = main(["prune", source, str(out), "--sparsity", "0.4", "--register-as", "demo-pruned",
               "--report", str(rep), "--latency-runs", "1"])
    assert rc == 0, capsys.readouterr().err
    assert "registered as models:/demo-pruned/1" in capsys.readouterr().out
    report = json.loads(rep.read_text())
    entry = report["mlflow"]
    assert entry == {"source": source, "name": "demo-pruned", "version": 1, "model_uri": "models:/demo-pruned/1",
                     "run_id": entry["run_id"]}

    version = store.client.get_model_version("demo-pruned", "1")
    assert version.run_id == entry["run_id"]
    assert version.tags["graphprune.source"] == source and version.tags["graphprune.sparsity"] == "0.4"
    assert version.tags["graphprune.criterion"] == "obs"  # what "auto" resolves to with OBS compensation
    assert version.tags["graphprune.version"]
    run = store.client.get_run(entry["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["sparsity"] == "0.4"
    metrics = run.data.metrics
    assert [metrics["params_before"], metrics["params_after"]] == [report["params"][k] for k in ("before", "after")]
    assert metrics["flops_ratio"] < 1 and "latency_ms_after" in metrics and "compensation_applied" in metrics

    import mlflow.onnx

    registered = mlflow.onnx.load_model("models:/demo-pruned/1")  # the onnx flavor, external data included
    assert initializer_count(registered) == report["params"]["after"] < initializer_count(demo_model())
    session = ort.InferenceSession(registered.SerializeToString())
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    expected = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    np.testing.assert_allclose(session.run(None, {"input": x})[0], expected, rtol=1e-5, atol=1e-5)

    # a second prune of the same source is the next version; an alias resolves like a version
    store.client.set_registered_model_alias("demo", "champion", "1")
    assert main(["prune", "models:/demo@champion", str(out), "--sparsity", "0.2", "--register-as", "demo-pruned",
                 *FAST]) == 0
    assert store.client.get_model_version("demo-pruned", "2").tags["graphprune.source"] == "models:/demo@champion"


@pytest.mark.slow
def test_local_file_registered_with_its_path(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "demo.onnx"
    onnx.save_model(demo_model(), str(src))
    assert main(["prune", str(src), str(tmp_path / "out.onnx"), "--sparsity", "0.3", "--register-as", "local",
                 "--tracking-uri", store.uri, *FAST]) == 0
    assert store.client.get_model_version("local", "1").tags["graphprune.source"] == str(src.absolute())


@pytest.mark.slow
def test_errors_name_the_problem(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out.onnx")
    assert main(["prune", "models:/nope/1", out, "--sparsity", "0.3", *FAST]) == 2
    assert "Registered Model with name=nope not found" in capsys.readouterr().err
    assert main(["prune", "models:/../x", out, "--sparsity", "0.3", *FAST]) == 2
    assert "not a supported MLflow model URI" in capsys.readouterr().err

    import mlflow

    with mlflow.start_run() as run:  # an artifact folder without a model
        mlflow.log_text("hello", "notes/readme.txt")
    assert main(["prune", f"runs:/{run.info.run_id}/notes", out, "--sparsity", "0.3", *FAST]) == 2
    assert "holds 0 .onnx files, expected exactly one (found: readme.txt)" in capsys.readouterr().err

    uri = store.register_demo("big")
    with pytest.raises(ModelTooLargeError, match="over the limit of 1,000 bytes"):
        mlflow_io.download(uri, tmp_path / "dl", max_bytes=1000)
    assert not (tmp_path / "dl").exists() or not any((tmp_path / "dl").iterdir())  # refused before downloading

    broken = f"sqlite:///{tmp_path / 'not-a-folder.txt' / 'mlflow.db'}"
    (tmp_path / "not-a-folder.txt").write_text("")
    with pytest.raises(mlflow_io.MlflowUnavailableError, match="cannot read models:/demo/1"):
        mlflow_io.download("models:/demo/1", tmp_path / "dl2", max_bytes=10**9, tracking_uri=broken)


def test_without_mlflow_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    assert main(["prune", "models:/demo/1", str(tmp_path / "o.onnx"), "--sparsity", "0.3", *FAST]) == 2
    assert "pip install 'graphprune[mlflow]'" in capsys.readouterr().err
