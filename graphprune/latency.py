"""Predicted latency of a pruned model, from a per-layer table measured with onnxruntime on this machine.

`--target latency` needs the time a plan saves before the plan is made. MACs do not say it: a layer's
time falls less than its MACs (fixed costs, narrow widths that fall off the vectorized kernels), and
activations, pooling and layout reorders cost time without MACs (28-44% of PP-OCR's dense kernel time,
benchmarks/profile_latency.py). So every layer with MACs (Conv, ConvTranspose, Gemm, MatMul, recurrent)
is timed on its own on one thread, at the shapes it has in the dense model and in copies pruned
uniformly by SAMPLES, as its kernel time in onnxruntime's profiler (a lone node's layout reorders are not
counted: inside a network most are not run). Each timing is cached by op signature (op, attributes,
input shapes and types: a network's repeated blocks are timed once, a second prune of the same model not
at all), and timing stops after a time budget: the layers left get the measured time per MAC. The rest
of the network is the dense model's measured latency less those layers, spread over its other nodes
by the values they write, each shrinking with its own outputs. A plan's latency is each layer's time
interpolated at the MACs it keeps, plus that rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto, NodeProto, TensorProto, helper

from graphprune import runtime
from graphprune.cost import CostModel
from graphprune.depgraph import DependencyGraph
from graphprune.machine import one_thread_session, read_cache, write_cache
from graphprune.reasons import ShapeUnknown
from graphprune.rules import rule_for
from graphprune.validate import run_times

CACHE = "latency.json"
SAMPLES = (0.25, 0.5, 0.75)  # uniform removal ratios the layers are also timed at (plus the dense shapes)
BUDGET_S = 60.0  # seconds of layer timing per prune (cached layers are free)
RUNS = 5  # timed runs per layer (the fastest is its kernel time) and per model (the median)
TIMING_S = 1.0  # seconds an end-to-end comparison runs for, within RUNS and MAX_RUNS runs of each model
MAX_RUNS = 101
MAX_ENTRIES = 20000  # cached signatures kept per machine

Shape = Callable[[str], tuple[int, ...]]


@dataclass
class Layer:
    """One node with MACs: its MACs in the dense model, and (MACs fraction, ms) where it was timed."""

    node: NodeProto
    macs: int
    points: list[tuple[float, float]] = field(default_factory=list)
    timed: bool = False

    def ms(self, fraction: float) -> float:
        xs, ys = zip(*sorted({(0.0, 0.0), *self.points}), strict=True)
        return float(np.interp(fraction, xs, ys))


class LatencyTable:
    """The latency of the graph a plan leaves, predicted in milliseconds (one thread)."""

    def __init__(self, graph: DependencyGraph, cost: CostModel) -> None:
        self.graph, self.cost = graph, cost
        dense = cost.shape_fn(None)
        self.layers: list[Layer] = []
        self._rest: list[NodeProto] = []
        for node in graph.model.graph.node:
            macs = _macs(node, dense)
            if macs:
                self.layers.append(Layer(node, macs))
            else:
                self._rest.append(node)
        self._rest_values = self._written(dense)
        # what the models spend outside the layers, against the share of values the other nodes write:
        # measured end to end (less the layers) on the dense model and each sample
        self.rest: list[tuple[float, float]] = []
        self.dense_ms = 0.0  # measured
        self.info: dict[str, Any] = {}

    def predict(self, removed_root: NDArray[np.bool_] | None = None) -> float:
        shape = self.cost.shape_fn(removed_root)
        return self._layers_ms(shape) + self._rest_ms(shape)

    def _layers_ms(self, shape: Shape) -> float:
        return sum(layer.ms(_macs(layer.node, shape) / layer.macs) for layer in self.layers)

    def _rest_ms(self, shape: Shape) -> float:
        if not self.rest:
            return 0.0
        xs, ys = zip(*sorted({(0.0, 0.0), *self.rest}), strict=True)
        return float(np.interp(self._written(shape) / max(1, self._rest_values), xs, ys))

    def _written(self, shape: Shape) -> int:
        total = 0
        for node in self._rest:
            for out in node.output:
                try:
                    total += math.prod(shape(out)) if out else 0
                except ShapeUnknown:
                    continue
        return total

    def describe(self) -> dict[str, Any]:
        dense = self.cost.shape_fn(None)
        return {"dense_measured_ms": round(self.dense_ms, 3), "layers_ms": round(self._layers_ms(dense), 3),
                "rest_ms": round(self._rest_ms(dense), 3), **self.info}


def _macs(node: NodeProto, shape: Shape) -> int:
    rule = rule_for(node)
    if rule is None:
        return 0
    try:
        return int(rule.macs(node, shape))
    except (ShapeUnknown, IndexError):
        return 0


def build_table(graph: DependencyGraph, cost: CostModel, samples: list[tuple[NDArray[np.bool_], ModelProto]],
                feeds: dict[str, NDArray[Any]], progress: Callable[[float], None] | None = None) -> LatencyTable:
    """Time the layers of `graph` at the dense shapes and at each sample (removed roots, pruned model)
    within BUDGET_S, and the dense model and samples end to end on `feeds`, on one thread."""
    table = LatencyTable(graph, cost)
    started = time.perf_counter()
    cache = read_cache(CACHE)
    hits = timed = 0
    cases = [(None, graph.model), *samples]
    order = sorted(table.layers, key=lambda layer: -layer.macs)  # the costliest first, within the budget
    with tempfile.TemporaryDirectory(prefix="gp-latency-") as scratch:
        for i, layer in enumerate(order):
            if progress is not None:
                progress(i / max(1, len(order)))
            if i and time.perf_counter() - started > BUDGET_S:
                break  # the largest layer is always timed: the others' time per MAC comes from it
            for removed, model in cases:
                shape = cost.shape_fn(removed)
                case = _single(layer.node, model, shape)
                if case is None:
                    break
                key = _signature(case[0])
                if key in cache:
                    hits += 1
                else:
                    ms = _kernel_ms(case, scratch)
                    if ms is None:
                        break
                    cache[key] = ms
                    timed += 1
                layer.points.append((_macs(layer.node, shape) / layer.macs, float(cache[key])))
            else:
                layer.timed = True
            if not layer.timed:
                layer.points.clear()
    _estimate_untimed(table, cost, [removed for removed, _ in cases])
    if len(cache) > MAX_ENTRIES:
        cache = dict(list(cache.items())[-MAX_ENTRIES:])
    write_cache(CACHE, cache)
    measured = interleaved_ms([model for _, model in cases], feeds, arrays=graph.known_const)
    table.dense_ms = measured[0]
    for (removed, _), ms in zip(cases, measured, strict=True):
        shape = cost.shape_fn(removed)
        table.rest.append((table._written(shape) / max(1, table._rest_values), max(0.0, ms - table._layers_ms(shape))))
    table.info = {"layers": len(table.layers), "layers_timed": sum(lay.timed for lay in table.layers),
                  "timings": timed, "cached": hits, "seconds": round(time.perf_counter() - started, 2)}
    return table


def _estimate_untimed(table: LatencyTable, cost: CostModel, cases: list[NDArray[np.bool_] | None]) -> None:
    """Layers past the budget (or that would not run alone) take the timed layers' ms per MAC."""
    timed = [layer for layer in table.layers if layer.timed]
    rate = (sum(lay.ms(1.0) for lay in timed) / sum(lay.macs for lay in timed)) if timed else 0.0
    for layer in table.layers:
        if not layer.timed:
            for removed in cases:
                kept = _macs(layer.node, cost.shape_fn(removed))
                layer.points.append((kept / layer.macs, kept * rate))


def _single(node: NodeProto, model: ModelProto, shape: Shape) -> tuple[ModelProto, dict[str, NDArray[Any]]] | None:
    """`node` as it is in `model` (its attributes rewritten by the plan), alone in a model: its constant
    inputs as they are there, the others random at the plan's shapes."""
    found = next((n for n in model.graph.node if list(n.output) == list(node.output)), None)
    if found is None:
        return None
    types = _types(model)
    inits = {t.name: t for t in model.graph.initializer}
    inputs, initializers, feeds = [], [], {}
    rng = np.random.default_rng(0)
    try:
        for name in found.input:
            if not name:
                continue
            if name in inits:
                initializers.append(inits[name])
                continue
            dtype = helper.tensor_dtype_to_np_dtype(types.get(name, TensorProto.FLOAT))
            dims = shape(name)
            inputs.append(helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), dims))
            feeds[name] = (rng.standard_normal(dims).astype(dtype) if np.issubdtype(dtype, np.floating)
                           else np.zeros(dims, dtype))
    except ShapeUnknown:
        return None
    copy = NodeProto()
    copy.CopyFrom(found)
    copy.name = "op"
    outputs = [helper.make_tensor_value_info(o, types.get(o, TensorProto.FLOAT), None) for o in found.output if o]
    graph = helper.make_graph([copy], "layer", inputs, outputs, initializers)
    single = helper.make_model(graph, opset_imports=list(model.opset_import))
    single.ir_version = model.ir_version
    return single, feeds


def _types(model: ModelProto) -> dict[str, int]:
    g = model.graph
    out = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


def _signature(model: ModelProto) -> str:
    """What the layer's time depends on: op, attributes, input shapes and types, not weight values."""
    node = model.graph.node[0]
    inputs = [(vi.name, [d.dim_value for d in vi.type.tensor_type.shape.dim], vi.type.tensor_type.elem_type)
              for vi in model.graph.input]
    inputs += [(t.name, list(t.dims), t.data_type) for t in model.graph.initializer]
    by_name = dict((name, (dims, dtype)) for name, dims, dtype in inputs)
    text = json.dumps([node.domain, node.op_type, sorted(helper.printable_attribute(a) for a in node.attribute),
                       [by_name.get(i) for i in node.input]])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _kernel_ms(case: tuple[ModelProto, dict[str, NDArray[Any]]], scratch: str) -> float | None:
    """The layer's kernel time: the fastest of RUNS profiled runs, layout reorders left out."""
    model, feeds = case
    try:
        sess = one_thread_session(model, profile_dir=scratch)
        for _ in range(RUNS + 1):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    except Exception:  # a layer that will not run alone is estimated instead
        return None
    runs: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") \
                and not str(e.get("args", {}).get("op_name", "")).startswith("Reorder"):
            runs.setdefault(e["name"], []).append(e["dur"] / 1e3)
    return sum(min(durs[1:] or durs) for durs in runs.values()) if runs else None


def interleaved_ms(models: list[ModelProto], feeds: dict[str, NDArray[Any]],
                   arrays: runtime.Arrays | None = None) -> list[float]:
    """Median latency of each model on one thread, their runs interleaved (load falls on all alike), as
    many runs as fit in about TIMING_S (RUNS to MAX_RUNS: a sub-millisecond model's median needs many);
    `arrays`: the first model's weights already in memory."""
    sessions = [runtime.session(m, threads=1, arrays=arrays if i == 0 else None) for i, m in enumerate(models)]
    first = run_times(sessions, feeds, 1)
    per_run = sum(t[0] for t in first) / 1e3
    runs = int(min(MAX_RUNS, max(RUNS, TIMING_S / max(per_run, 1e-6))))
    return [statistics.median(t) for t in run_times(sessions, feeds, runs)]
