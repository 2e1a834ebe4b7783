"""Hardware-friendly widths: the channel multiple onnxruntime's CPU kernels prefer, measured here.

`--round-to auto` keeps every group's width a multiple of what its layers run fastest at, as
measured on this machine, not assumed: per kind of layer (dense conv, depthwise conv, MatMul/Gemm)
one small op is timed at every width in a window, and a multiple counts when widths that are
multiples of it cost at least 1 - `GAIN` less per MAC than the window's trend (onnxruntime's
NCHWc convolutions block channels by 8 on AVX2, 16 on AVX-512: depthwise convs at odd widths were
2.6-3.4x slower, benchmarks/profile_latency.py). The measurement takes a second or two and is cached
per onnxruntime version and CPU (`GRAPHPRUNE_CACHE_DIR`, else ~/.cache/graphprune).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from graphprune.machine import machine_key, one_thread_session, read_cache, write_cache

if TYPE_CHECKING:
    from graphprune.depgraph import DependencyGraph
    from graphprune.groups import Grouping

CACHE = "widths.json"
KINDS = ("conv", "depthwise", "matmul")
CANDIDATES = (4, 8, 16)
WINDOW = range(33, 65)  # widths timed: every multiple of 4, 8 and 16 appears at least twice
GAIN = 0.85  # the best multiple must cost at most this share of the window's median time per MAC
TOLERANCE = 0.1  # a smaller multiple within this of the best one's cost is taken instead
RUNS = 25
CHAIN = 4  # blocks per timed chain


def measured_multiples() -> dict[str, dict[str, Any]]:
    """Per kind: the preferred multiple and the per-MAC cost ratio of each candidate (cached)."""
    return dict(_cached(machine_key()))


@functools.cache
def _cached(key: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """The table for machine `key` (the argument keys the in-process cache), measured once per machine."""
    table = read_cache(CACHE)
    if not all(kind in table for kind in KINDS):
        table = {kind: _measure(kind) for kind in KINDS}
        write_cache(CACHE, table)
    return tuple(table.items())


def _measure(kind: str) -> dict[str, Any]:
    """Time per MAC at multiples of each candidate, relative to every width of the window; the
    multiple is the smallest that gets within TOLERANCE of the best one, if the best saves GAIN."""
    widths = np.array(WINDOW)
    per_mac = np.array([_marginal(kind, int(c)) / _macs(kind, int(c)) for c in widths])
    # relative to the smooth trend over the window (wider ops amortize their overheads better, which
    # would otherwise favour the large multiples just for sitting at the wide end)
    trend = np.exp(np.polyval(np.polyfit(widths, np.log(per_mac), 2), widths))
    relative = per_mac / trend
    cost = {m: float(np.median(relative[widths % m == 0]) / np.median(relative)) for m in CANDIDATES}
    best = min(cost.values())
    multiple = next(m for m in CANDIDATES if cost[m] <= best * (1 + TOLERANCE)) if best <= GAIN else 1
    return {"multiple": multiple, "cost_ratio": {str(m): round(v, 3) for m, v in cost.items()}}


OUTER = 64  # the unpruned width around the timed block (a residual stream, kept a multiple of 8)
SIZE = 16  # spatial size of the conv blocks' inputs; MatMul blocks have 64 rows


def _macs(kind: str, c: int) -> int:
    inner = {"conv": 9 * c * c, "depthwise": 9 * c, "matmul": 0}[kind]
    rows = SIZE * SIZE if kind != "matmul" else 64
    return rows * (2 * OUTER * c + inner)


def _marginal(kind: str, c: int) -> float:
    """Seconds one more block adds to a chain of them, so the layout reorders onnxruntime puts at the
    chain's ends (a network pays those once) do not count, while those between layers do."""
    return max((_time(_op(kind, c, CHAIN)) - _time(_op(kind, c, 1))) / (CHAIN - 1), 1e-9)


def _op(kind: str, c: int, blocks: int) -> tuple[ModelProto, dict[str, np.ndarray]]:
    """`blocks` blocks of what a pruned width `c` sits in: a bottleneck (1x1 to c, 3x3 or depthwise 3x3
    at c, 1x1 back to OUTER) or an MLP (MatMul to c and back)."""
    rng = np.random.default_rng(c)
    conv = kind != "matmul"

    def weight(name: str, shape: tuple[int, ...]) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32),
                                       name)

    inits = [weight("up", (c, OUTER, 1, 1) if conv else (OUTER, c)),
             weight("down", (OUTER, c, 1, 1) if conv else (c, OUTER))]
    if conv:
        inits.append(weight("mid", (c, c, 3, 3) if kind == "conv" else (c, 1, 3, 3)))
    nodes, x = [], "x"
    for b in range(blocks):
        if conv:
            nodes += [helper.make_node("Conv", [x, "up"], [f"u{b}"]),
                      helper.make_node("Conv", [f"u{b}", "mid"], [f"m{b}"], pads=[1, 1, 1, 1],
                                       group=1 if kind == "conv" else c),
                      helper.make_node("Conv", [f"m{b}", "down"], [f"d{b}"])]
        else:
            nodes += [helper.make_node("MatMul", [x, "up"], [f"m{b}"]),
                      helper.make_node("MatMul", [f"m{b}", "down"], [f"d{b}"])]
        x = f"d{b}"
    shape = [1, OUTER, SIZE, SIZE] if conv else [64, OUTER]
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"x": rng.standard_normal(shape).astype(np.float32)}


def _time(case: tuple[ModelProto, dict[str, np.ndarray]]) -> float:
    """Fastest of RUNS single-threaded runs (the minimum is what the kernel costs; noise only adds)."""
    model, feeds = case
    sess = one_thread_session(model)
    sess.run(None, feeds)
    best = float("inf")
    for _ in range(RUNS):
        t = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - t)
    return best


# --------------------------------------------------------------------------- groups


def group_kinds(graph: DependencyGraph, grouping: Grouping) -> dict[int, set[str]]:
    """Per group, the kinds of layer whose weights it slices (a conv's output or input channels...)."""
    kinds: dict[int, set[str]] = {}
    for group in grouping.groups:
        found: set[str] = set()
        for member in group.members:
            if member.role not in ("out", "in"):
                continue
            for node in graph.users.get(member.tensor, []):
                found |= _kind(node.op_type, node.attribute, graph, member.tensor)
        kinds[group.id] = found
    return kinds


def _kind(op: str, attributes: Any, graph: DependencyGraph, weight: str) -> set[str]:
    if op in ("MatMul", "Gemm"):
        return {"matmul"}
    if op in ("Conv", "ConvTranspose"):
        group = next((a.i for a in attributes if a.name == "group"), 1)
        return {"depthwise" if group > 1 and graph.shape(weight)[1] == 1 else "conv"}
    return set()


SHARE = 2  # a group's multiple is at most half its units


def group_multiples(graph: DependencyGraph, grouping: Grouping, round_to: int | str,
                    measure: Callable[[], dict[str, dict[str, Any]]] = measured_multiples) -> dict[int, int]:
    """The multiple each group's kept width must be: `round_to` for all, or with "auto" the largest
    measured preference among its layers' kinds (1 where they have none), halved until it is at most
    half the group."""
    if round_to != "auto":
        return {g.id: int(round_to) for g in grouping.groups}
    table = measure()
    sizes = {g.id: g.size for g in grouping.groups}
    return {gid: _capped(max([table[k]["multiple"] for k in kinds] or [1]), sizes[gid])
            for gid, kinds in group_kinds(graph, grouping).items()}


def _capped(multiple: int, size: int) -> int:
    """At most half the group: a 16-wide group rounded to 16 could only stay or go whole."""
    while multiple > 1 and multiple * SHARE > size:
        multiple //= 2
    return multiple
