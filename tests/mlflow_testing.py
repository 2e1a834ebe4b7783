"""A local MLflow store for tests: SQLite tracking + registry and a file artifact root in tmp_path, no
server. Creating MLflow's schema costs ~7 s, so an empty migrated database is built once per test
session (under a file lock, shared by the xdist workers) and copied for every test."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from graphprune.demo import demo_model

pytest.importorskip("mlflow")


@dataclass
class Store:
    uri: str
    client: Any  # mlflow.MlflowClient

    def register_demo(self, name: str = "demo") -> str:
        """Log the demo CNN with MLflow's onnx flavor and register it; → its `models:/` URI."""
        import mlflow.onnx

        with mlflow.start_run():
            info = mlflow.onnx.log_model(demo_model(), name="model", registered_model_name=name,
                                         pip_requirements=["onnx", "onnxruntime"])
        return f"models:/{name}/{info.registered_model_version}"


def local_store(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A fresh store, set as MLflow's default through the environment (workers spawned later inherit it)."""
    import mlflow
    from mlflow import MlflowClient

    template = tmp_path_factory.getbasetemp().parent / f"mlflow-{mlflow.__version__}-empty.db"
    with FileLock(f"{template}.lock"):
        if not template.exists():
            scratch = template.with_suffix(".tmp")
            scratch.unlink(missing_ok=True)
            MlflowClient(f"sqlite:///{scratch}").search_experiments()  # creates and migrates the schema
            scratch.rename(template)
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template, db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri, uri)
    experiment = client.create_experiment("graphprune-tests", artifact_location=(tmp_path / "artifacts").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return Store(uri, client)


def initializer_count(model: Any) -> int:
    """Parameters of an onnx ModelProto (all initializer elements)."""
    import numpy as np

    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)
