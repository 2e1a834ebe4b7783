"""onnxruntime sessions for analysis and validation (CPU, no custom-op libraries ever)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import ModelProto

from graphprune.errors import InvalidModelError

# onnx 1.23 writes IR 14 by default and onnxruntime 1.31 reads less; graphprune keeps the user's IR
# version in what it writes and only lowers it in the private copy it runs.
RUNTIME_IR_VERSION = 10


def session(model: ModelProto, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    runnable = model
    if model.ir_version > RUNTIME_IR_VERSION:
        runnable = ModelProto()
        runnable.CopyFrom(model)
        runnable.ir_version = RUNTIME_IR_VERSION
    try:
        return ort.InferenceSession(runnable.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise InvalidModelError(f"onnxruntime cannot load the model: {exc}".strip()) from exc


def probe_session(model: ModelProto, names: list[str]) -> ort.InferenceSession:
    """A session that also returns the intermediate tensors `names` (a copy; the model is untouched)."""
    probe = ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return session(probe)


def run(sess: ort.InferenceSession, feeds: dict[str, NDArray[Any]],
        outputs: list[str] | None = None) -> dict[str, NDArray[Any]]:
    names = outputs or [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, feeds)
    except Exception as exc:
        shapes = ", ".join(f"{k}={list(v.shape)}" for k, v in feeds.items())
        raise InvalidModelError(
            f"onnxruntime failed to run the model on inputs {shapes}: {exc}; if an input has dynamic "
            "dimensions, give a shape the model accepts with --input-shape NAME=D1,D2,...".strip()) from exc
    return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}
