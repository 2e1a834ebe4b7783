"""Data-free OBS compensation of every consumer of removed channels.

Statistics H = E[x xᵀ] of each consumer's input columns (plus the constant 1 for the bias) come from
the dense model run on synthetic inputs, or on the user's calibration .npz, streamed batch by batch
through onnxruntime with the consumers' inputs exposed as extra outputs. obs.py does the math; the
result is a set of replacement weights that surgery then slices.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto
from threadpoolctl import threadpool_limits

from graphprune import runtime
from graphprune.config import PruneConfig
from graphprune.consumers import LinearView, linear_views
from graphprune.depgraph import DependencyGraph
from graphprune.errors import UsageError
from graphprune.inputs import InputSpec
from graphprune.obs import obs_remove
from graphprune.synthetic import batches, dynamic_batch

MAX_ROWS_PER_BATCH = 1024  # rows sampled per consumer per batch: the d² accumulation dominates on big nets
BATCH = 16


@dataclass
class Compensation:
    overrides: dict[str, NDArray[Any]] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    source: str = "none"
    seconds: float = 0.0
    applied: bool = False
    self_check: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "obs" if self.overrides else "none", "source": self.source, "applied": self.applied,
                "self_check": self.self_check, "layers": self.layers, "seconds": round(self.seconds, 3)}


def calibration_batches(path: str, specs: list[InputSpec], samples: int) -> Iterator[dict[str, NDArray[Any]]]:
    """The user's real inputs: one array per model input, batch-first, named like the input."""
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read calibration file {path!r}: {exc}; expected an .npz of input arrays") from exc
    missing = [s.name for s in specs if s.name not in data.files]
    if missing:
        raise UsageError(f"calibration file {path!r} lacks arrays for input(s) {missing}; it has {data.files}")
    total = min(samples, min(int(data[s.name].shape[0]) for s in specs))
    for start in range(0, total, BATCH):
        yield {s.name: np.asarray(data[s.name][start : start + BATCH]).astype(s.dtype) for s in specs}


def input_batches(model: ModelProto, specs: list[InputSpec], cfg: PruneConfig, kind: str,
                  seed: int) -> tuple[str, Iterable[dict[str, NDArray[Any]]]]:
    if cfg.calibration and cfg.hessian_source in ("auto", "calibration"):
        return "calibration", calibration_batches(cfg.calibration, specs, cfg.samples)
    if cfg.hessian_source == "calibration":
        raise UsageError("hessian_source='calibration' needs --calibration FILE.npz")
    batch = BATCH if dynamic_batch(model) else None
    return f"synthetic:{kind}", batches(specs, cfg.samples, batch, kind, seed)


def layer_moments(model: ModelProto, views: list[LinearView], feeds: Iterable[dict[str, NDArray[Any]]],
                  seed: int) -> dict[str, NDArray[np.float64]]:
    """E[[x; 1][x; 1]ᵀ] over each view's input columns, streamed batch by batch."""
    names = list(dict.fromkeys(v.x for v in views))
    sess = runtime.probe_session(model, names)
    rng = np.random.default_rng(seed)
    sums: dict[str, NDArray[np.float64]] = {}
    count = dict.fromkeys((v.node for v in views), 0)
    for batch in feeds:
        acts = runtime.run(sess, batch, names)
        for v in views:
            rows = v.columns(acts[v.x], MAX_ROWS_PER_BATCH, rng)
            rows = np.hstack([rows, np.ones((rows.shape[0], 1))])
            sums[v.node] = sums[v.node] + rows.T @ rows if v.node in sums else rows.T @ rows
            count[v.node] += rows.shape[0]
    return {k: total / count[k] for k, total in sums.items()}


def compensate(graph: DependencyGraph, removed_elem: NDArray[np.bool_], specs: list[InputSpec],
               cfg: PruneConfig, kind: str = "blobs") -> Compensation:
    """OBS-corrected weights (and biases) for every consumer that loses input channels.

    BLAS runs single-threaded here: on a shared 2-core machine OpenBLAS's spinning threads made
    these many mid-sized products and factorisations 10x slower (measured), not faster.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _compensate(graph, removed_elem, specs, cfg, kind)


def _compensate(graph: DependencyGraph, removed_elem: NDArray[np.bool_], specs: list[InputSpec],
                cfg: PruneConfig, kind: str) -> Compensation:
    start = time.perf_counter()
    views = linear_views(graph, removed_elem)
    if not views:
        return Compensation()
    if cfg.hessian_source == "identity":
        source = "identity"
        stats = {v.node: np.eye(v.matrix(graph.const(v.weight)).shape[1] + 1) for v in views}
    else:
        source, feeds = input_batches(graph.model, specs, cfg, kind, cfg.seed + 1)
        stats = layer_moments(graph.model, views, feeds, cfg.seed)
    comp = Compensation(source=source)
    for v in views:
        _compensate_layer(graph, v, stats[v.node], cfg.damping, comp)
    comp.seconds = time.perf_counter() - start
    return comp


def _compensate_layer(graph: DependencyGraph, v: LinearView, h: NDArray[np.float64], damping: float,
                      comp: Compensation) -> None:
    w = graph.const(v.weight)
    m = v.matrix(w)
    bias = graph.const(v.bias) if v.bias else None
    if bias is None:  # no bias slot: drop the constant row/column
        h = h[:-1, :-1]
        aug = m
    else:
        aug = np.hstack([m, np.asarray(bias, dtype=np.float64).reshape(-1, 1)])
    remove = v.removed_columns()
    energy = float(((aug @ h) * aug).sum()) or 1.0
    res = obs_remove(aug, h, remove, damping)
    kept = np.setdiff1d(np.arange(aug.shape[1]), remove)
    full = np.zeros_like(aug)
    full[:, kept] = res.weights
    comp.overrides[v.weight] = v.unmatrix(full[:, : m.shape[1]], w)
    if bias is not None and v.bias:
        comp.overrides[v.bias] = full[:, -1].astype(bias.dtype).reshape(bias.shape)
    comp.layers.append({"node": v.node, "op": v.op, "removed_inputs": int((~v.keep).sum()),
                        "inputs": int(v.keep.size), "predicted_rel_error": res.error / energy})
