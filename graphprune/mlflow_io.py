"""MLflow model URIs in, registered model versions out (the optional extra `graphprune[mlflow]`).

The only module that imports mlflow, and only inside the functions that need it: importing it
costs seconds and most users never do. The store is whatever MLflow itself is configured with
(`MLFLOW_TRACKING_URI`, `MLFLOW_REGISTRY_URI`, `MLFLOW_EXPERIMENT_ID|NAME`) unless a tracking URI
is passed. URIs are checked by pattern before any store is asked, so a request cannot use this
module to read arbitrary paths (`runs:/<id>/../..`) or other schemes (`file:`, `s3:`).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from graphprune import __version__
from graphprune.errors import ModelTooLargeError, UsageError
from graphprune.report import Report

if TYPE_CHECKING:
    from graphprune.api import PruneResult

INSTALL_HINT = "pip install 'graphprune[mlflow]'"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
SCHEMES = ("models:/", "runs:/")
MODEL_DIR = "model"  # artifact path of the pruned model inside its run
_SEGMENT = r"[^/?#\\\x00-\x1f]+"
_MODELS_URI = re.compile(rf"models:/{_SEGMENT}(?:/{_SEGMENT})?")  # name, name/version|stage, name@alias, m-<id>
_RUNS_URI = re.compile(rf"runs:/[0-9a-f]{{32}}(?:/{_SEGMENT})*/?")
# a registered model name: no slashes, backslashes or control characters, no surrounding whitespace
NAME_PATTERN = r"^[^/\\\x00-\x1f\s]([^/\\\x00-\x1f]*[^/\\\x00-\x1f\s])?$"
_NAME = re.compile(NAME_PATTERN)
_MAX_LISTED = 10_000  # artifact entries walked before giving up (a URI pointing at a huge run)
# error codes that mean "this URI or name is wrong", not "the store is down"
_CLIENT_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE", "BAD_REQUEST",
                           "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_ALREADY_EXISTS"})


class MlflowError(UsageError):
    """The URI or name is malformed, names nothing, or holds no single .onnx model."""


class MlflowUnavailableError(MlflowError):
    """The tracking or registry store could not be reached or failed."""


def is_model_uri(text: str) -> bool:
    """True for text meant as an MLflow model URI rather than a file path."""
    return text.startswith(SCHEMES)


def check_uri(uri: str) -> str:
    """`uri` if it is a `models:/` or `runs:/` URI without `.`/`..` segments; else MlflowError."""
    segments = uri.split(":/", 1)[-1].split("/")
    if not (_MODELS_URI.fullmatch(uri) or _RUNS_URI.fullmatch(uri)) or {".", ".."} & set(segments):
        raise MlflowError(f"not a supported MLflow model URI: {uri!r}; expected models:/NAME/VERSION, "
                          "models:/NAME@ALIAS or runs:/RUN_ID/PATH")
    return uri


def check_name(name: str) -> str:
    """`name` if MLflow can register a model under it (1-256 characters, no slashes or control characters)."""
    if not _NAME.fullmatch(name) or len(name) > 256:
        raise MlflowError(f"not a usable registered model name: {name!r} (1-256 characters, no slashes, "
                          "control characters or surrounding spaces)")
    return name


def unavailable_reason() -> str | None:
    """Why a server may not use MLflow (not installed, no store configured), or None if it may.

    A server never falls back to MLflow's default local store: that would be a folder nobody reads.
    """
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        return f"MLflow is not installed on this server ({INSTALL_HINT})"
    if not os.environ.get(TRACKING_ENV):
        return f"this server has no MLflow store configured ({TRACKING_ENV})"
    return None


def _mlflow() -> ModuleType:
    try:
        import mlflow
    except ImportError:
        raise UsageError(f"MLflow model URIs and --register-as need MLflow: {INSTALL_HINT}") from None
    return mlflow


@contextmanager
def _store_errors(what: str) -> Iterator[None]:
    """MLflow's and its transports' exceptions as MlflowError (our mistake) or MlflowUnavailableError."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        cls = MlflowError if exc.error_code in _CLIENT_CODES else MlflowUnavailableError
        raise cls(f"{what}: {exc.message}") from exc
    except (UsageError, ModelTooLargeError):
        raise
    except Exception as exc:  # requests, sqlalchemy, boto, OSError...: the store did not answer
        raise MlflowUnavailableError(f"{what}: the MLflow store failed: {type(exc).__name__}: {exc}") from exc


@contextmanager
def _tracking(tracking_uri: str | None) -> Iterator[None]:
    """Use `tracking_uri` for the duration, through the environment: MLflow resolves `models:/` URIs
    with its process-wide default whatever URI a call is given, and an explicit `set_tracking_uri`
    could not be undone to "unset"."""
    if not tracking_uri:
        yield
        return
    previous = os.environ.get(TRACKING_ENV)
    os.environ[TRACKING_ENV] = tracking_uri
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TRACKING_ENV, None)
        else:
            os.environ[TRACKING_ENV] = previous


# ------------------------------------------------------------------------------------------ input


def download(uri: str, dest: Path, *, max_bytes: int, tracking_uri: str | None = None) -> Path:
    """Download the folder of the one .onnx file under `uri` into `dest`; → the local .onnx path.

    Sizes are checked from the listing before anything is fetched (and again on disk), so a
    model over `max_bytes` is refused without being downloaded. External-data files beside the
    .onnx come along; the safe loader resolves them later.
    """
    check_uri(uri)
    _mlflow()
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    with _tracking(tracking_uri), _store_errors(f"cannot read {uri}"):
        repo = get_artifact_repository(uri)
        files = _walk(repo, uri)
    models = [p for p in files if p.lower().endswith(".onnx")]
    if len(models) != 1:
        found = ", ".join(sorted(files)[:20]) or "nothing"
        raise MlflowError(f"{uri} holds {len(models)} .onnx files, expected exactly one (found: {found})"
                          + ("; point a runs:/ URI at the folder of the one you want" if models else ""))
    folder = posixpath.dirname(models[0])
    scope = {p: size for p, size in files.items() if not folder or p.startswith(folder + "/")}
    _check_size(uri, sum(s or 0 for s in scope.values()), max_bytes)
    with _tracking(tracking_uri), _store_errors(f"cannot download {uri}"):
        local = Path(repo.download_artifacts(folder, dst_path=str(dest)))
    _check_size(uri, sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()), max_bytes)
    path = (local if folder else dest) / posixpath.basename(models[0])
    if not path.is_file():
        raise MlflowError(f"{uri}: {models[0]} was listed but not downloaded")
    return path


@contextmanager
def fetched(uri: str, *, max_bytes: int, tracking_uri: str | None = None) -> Iterator[Path]:
    """`download` into a temporary folder that is deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="graphprune-mlflow-") as tmp:
        yield download(uri, Path(tmp), max_bytes=max_bytes, tracking_uri=tracking_uri)


def _walk(repo: Any, uri: str) -> dict[str, int | None]:
    """Every file under the repository root → its size (None where the store does not say)."""
    files: dict[str, int | None] = {}
    pending = [""]
    while pending:
        for info in repo.list_artifacts(pending.pop() or None):
            if info.is_dir:
                pending.append(info.path)
            else:
                files[info.path] = info.file_size
            if len(files) + len(pending) > _MAX_LISTED:
                raise MlflowError(f"{uri} holds over {_MAX_LISTED:,} artifacts; point the URI at the model's folder")
    return files


def _check_size(uri: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ModelTooLargeError(f"{uri} is {size:,} bytes, over the limit of {max_bytes:,} bytes")


# ------------------------------------------------------------------------------------------ output


@dataclass
class RegisteredReport(Report):
    """A report with the `mlflow` entry of the model version it was registered as."""

    mlflow: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.mlflow
        return super().summary() + f"\nregistered as {m['model_uri']} (MLflow run {m['run_id']})"


def register_result(result: PruneResult, *, name: str, source: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Register a prune's model as a new version of `name` and add the `mlflow` entry to its report;
    the one path the CLI and the service's workers share."""
    with tempfile.TemporaryDirectory(prefix="graphprune-mlflow-") as tmp:
        path = Path(tmp) / "model.onnx"
        result.save(path)
        entry = register(path, result.report.to_dict(), name=name, source=source, tracking_uri=tracking_uri)
    result.report = RegisteredReport(**{f.name: getattr(result.report, f.name) for f in fields(result.report)},
                                     mlflow=entry)
    return entry


def register(model_path: Path, report: dict[str, Any], *, name: str, source: str,
             tracking_uri: str | None = None) -> dict[str, Any]:
    """Log the pruned model (mlflow.onnx flavor) in a new run with the report's numbers as metrics,
    and register it as a new version of `name`; → the report's `mlflow` entry."""
    check_name(name)
    _mlflow()
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    tags = version_tags(report, source)
    now = int(time.time() * 1000)
    with _tracking(tracking_uri), _store_errors(f"cannot register {name!r}"):
        client = MlflowClient()
        run = client.create_run(_experiment_id(client), run_name=f"graphprune {name}", tags=tags)
        run_id = run.info.run_id
        try:
            client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in run_metrics(report).items()],
                             params=[Param(k, v) for k, v in run_params(report).items()])
            with tempfile.TemporaryDirectory(prefix="graphprune-mlflow-") as tmp:
                mlflow.onnx.save_model(onnx.load(str(model_path)), str(Path(tmp) / MODEL_DIR),
                                       pip_requirements=_requirements())  # no requirement inference: ~5 s
                client.log_artifacts(run_id, str(Path(tmp) / MODEL_DIR), MODEL_DIR)
            client.log_text(run_id, json.dumps(report, indent=2), "graphprune/report.json")
            _ensure_registered_model(client, name)
            version = client.create_model_version(name, f"{run.info.artifact_uri}/{MODEL_DIR}", run_id=run_id,
                                                  tags=tags, description=f"pruned by graphprune from {source}")
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
    return {"source": source, "name": name, "version": int(version.version),
            "model_uri": f"models:/{name}/{version.version}", "run_id": run_id}


def _experiment_id(client: Any) -> str:
    """MLflow's own convention: MLFLOW_EXPERIMENT_ID, else MLFLOW_EXPERIMENT_NAME (created if new), else 0."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if not name:
        return "0"
    experiment = client.get_experiment_by_name(name)
    return str(experiment.experiment_id) if experiment else str(client.create_experiment(name))


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="pruned ONNX models, registered by graphprune")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("onnx", "onnxruntime")]


def version_tags(report: dict[str, Any], source: str) -> dict[str, str]:
    """What the version came from and how: enough to find and reproduce it from the registry UI."""
    config = report.get("config", {})
    tags = {"graphprune.source": source, "graphprune.version": __version__}
    for key in ("sparsity", "target", "criterion", "global_ranking", "compensate"):
        if key in config:
            tags[f"graphprune.{key}"] = str(config[key])
    if report.get("importance", {}).get("criterion"):  # what "auto" resolved to
        tags["graphprune.criterion"] = str(report["importance"]["criterion"])
    return tags


def run_params(report: dict[str, Any]) -> dict[str, str]:
    """The prune config as run parameters (JSON for lists and mappings; MLflow caps values at 6000)."""
    return {k: (v if isinstance(v, str) else json.dumps(v))[:6000] for k, v in report.get("config", {}).items()}


def run_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's numbers as flat metric names: sizes and ratios, latency, validation, compensation."""
    metrics: dict[str, float] = {}
    for key in ("params", "flops", "bytes"):
        counts = report.get(key) or {}
        if "before" in counts and "after" in counts:
            metrics[f"{key}_before"], metrics[f"{key}_after"] = counts["before"], counts["after"]
            if counts["before"]:
                metrics[f"{key}_ratio"] = counts["after"] / counts["before"]
    validation = report.get("validation") or {}
    latency = validation.get("latency_ms") or {}
    for when in ("before", "after"):
        if latency.get(when) is not None:
            metrics[f"latency_ms_{when}"] = latency[when]
    if latency.get("before") and latency.get("after"):
        metrics["speedup"] = latency["before"] / latency["after"]
    for output in validation.get("outputs", []):
        label = _metric_name(str(output.get("output", "")))
        for key in ("max_abs_err", "max_rel_err", "cosine", "top1_agreement"):
            if isinstance(output.get(key), int | float):
                metrics[f"validation.{label}.{key}"] = output[key]
    equivalence = validation.get("equivalence") or {}
    if "passed" in equivalence:
        metrics["equivalence_passed"] = float(bool(equivalence["passed"]))
        if isinstance(equivalence.get("max_rel_err"), int | float):
            metrics["equivalence_max_rel_err"] = equivalence["max_rel_err"]
    compensation = report.get("compensation") or {}
    if compensation.get("method"):
        metrics["compensation_applied"] = float(bool(compensation.get("applied")))
        metrics["compensation_layers"] = len(compensation.get("layers", []))
        for key, value in (compensation.get("self_check") or {}).items():
            if isinstance(value, int | float):
                metrics[f"compensation.{key}"] = value
    groups = report.get("groups") or {}
    for key in ("total", "prunable", "pruned"):
        if isinstance(groups.get(key), int):
            metrics[f"groups_{key}"] = groups[key]
    return {k: float(v) for k, v in metrics.items()}


def _metric_name(text: str) -> str:
    """MLflow metric names allow letters, digits and `_-. /`; anything else becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", text)[:200] or "output"
