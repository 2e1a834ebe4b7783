"""Data-free OBS compensation of every consumer of removed channels.

Statistics H = E[x xᵀ] of each consumer's input columns (plus the constant 1 for the bias) come from
the dense model run on synthetic inputs, or on the user's calibration .npz, streamed batch by batch
through onnxruntime with the consumers' inputs exposed as extra outputs. `LayerStatistics` computes
them once per prune and shares them between the OBS criterion and compensation. obs.py does the math;
the result is a set of replacement weights that surgery then slices.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto
from threadpoolctl import ThreadpoolController, threadpool_limits

from graphprune import runtime
from graphprune.config import PruneConfig
from graphprune.consumers import LinearView, linear_views, tap_coverage
from graphprune.depgraph import DependencyGraph
from graphprune.errors import UsageError
from graphprune.inputs import InputSpec, read_arrays
from graphprune.obs import Kron, Moments, energy, obs_remove
from graphprune.synthetic import batches, dynamic_batch

MAX_ROWS_PER_BATCH = 1024  # rows sampled per consumer per batch: the d² accumulation dominates on big nets
FLUSH_ROWS = 1024  # rows gathered per consumer before one Gram product (see MomentSums)
TAP_ROWS_PER_BATCH = 256  # patches per batch for a factored H's k×k tap moments (only error estimates use them)
BATCH = 16
T = TypeVar("T")


@dataclass
class Compensation:
    overrides: dict[str, NDArray[Any]] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    source: str = "none"
    seconds: float = 0.0
    applied: bool = False
    self_check: dict[str, float] = field(default_factory=dict)
    # per corrected layer: its view and the compensated [W | b] (removed columns zero), for measuring
    fits: list[tuple[LinearView, NDArray[np.float64]]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "obs" if self.overrides else "none", "source": self.source, "applied": self.applied,
                "self_check": self.self_check, "layers": self.layers, "seconds": round(self.seconds, 3)}


def calibration_batches(path: str, specs: list[InputSpec], samples: int) -> Iterator[dict[str, NDArray[Any]]]:
    """The user's real inputs: one array per model input, batch-first, named like the input."""
    arrays = read_arrays(path, specs)
    total = min(samples, next(iter(arrays.values())).shape[0])
    for start in range(0, total, BATCH):
        yield {name: array[start : start + BATCH] for name, array in arrays.items()}


def input_batches(model: ModelProto, specs: list[InputSpec], cfg: PruneConfig, kind: str,
                  seed: int) -> tuple[str, Iterable[dict[str, NDArray[Any]]]]:
    if cfg.calibration and cfg.hessian_source in ("auto", "calibration"):
        return "calibration", calibration_batches(cfg.calibration, specs, cfg.samples)
    if cfg.hessian_source == "calibration":
        raise UsageError("hessian_source='calibration' needs --calibration FILE.npz")
    batch = BATCH if dynamic_batch(model) else None
    return f"synthetic:{kind}", batches(specs, cfg.samples, batch, kind, seed)


def factored(v: LinearView, cfg: PruneConfig) -> bool:
    """Whether `v` holds its moments Kronecker-factored: a Conv with a kernel wider than 1 and more
    im2col columns than `cfg.kron_columns` (for a 1×1 kernel the two forms are the same)."""
    return v.op == "Conv" and v.block > 1 and v.keep.size * v.block > cfg.kron_columns


class MomentSums:
    """Running E[[x; 1][x; 1]ᵀ] of each view's input columns, fed one batch of activations at a time;
    Kronecker-factored for views marked `kron`: channel moments with the constant channel, averaged
    over every kernel tap of every output position (padding included), from the pixels weighted by
    how many taps read them (P·C² per batch instead of N·k²·C²), and tap moments from sampled patches.

    Rows are sampled by a generator seeded per consumer, so a consumer's moments do not depend on
    which other consumers share the pass. An exact view's rows are gathered until FLUSH_ROWS, then
    go into one float32 Gram product added into the float64 sum: a batch-1 ResNet-50 gives its last
    stage 49 rows a batch, and a d² pass per 49 rows (2048² for the widest) cost more than the product."""

    def __init__(self, views: list[LinearView], seed: int) -> None:
        self.views = views
        self.rngs = {v.node: np.random.default_rng([seed, zlib.crc32(v.node.encode())]) for v in views}
        self.sums: dict[str, NDArray[np.float64]] = {}
        self.tap_sums: dict[str, NDArray[np.float64]] = {}
        self.pending: dict[str, list[NDArray[np.float32]]] = {v.node: [] for v in views}
        self.threads, self.blas = runtime.idle_cpus(), ThreadpoolController()  # the controller scans libraries once
        self.count = dict.fromkeys(self.rngs, 0)

    @property
    def names(self) -> list[str]:
        """The activations the views read (to expose as extra outputs)."""
        return list(dict.fromkeys(v.x for v in self.views))

    def add(self, acts: dict[str, NDArray[Any]]) -> None:
        for v in self.views:
            if v.kron:
                self._add_kron(v, acts[v.x])
                continue
            rows = v.columns(acts[v.x], MAX_ROWS_PER_BATCH, self.rngs[v.node])
            self.pending[v.node].append(rows)
            self.count[v.node] += rows.shape[0]
            if sum(len(r) for r in self.pending[v.node]) >= FLUSH_ROWS:
                self._flush(v.node)

    def _flush(self, node: str) -> None:
        """Add the gathered rows' [x; 1] moments: one float32 GEMM (1.6x faster than float64), summed
        in float64; the constant column is the rows' sums, so no widened copy is made."""
        parts = self.pending[node]
        if not parts:
            return
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        parts.clear()
        d = rows.shape[1]
        if node not in self.sums:
            self.sums[node] = np.zeros((d + 1, d + 1))
        total = self.sums[node]
        with self.blas.limit(limits=self.threads, user_api="blas"):  # syrk: the same bits on any count
            total[:d, :d] += rows.T @ rows
        col = rows.sum(axis=0, dtype=np.float64)
        total[:d, d] += col
        total[d, :d] += col
        total[d, d] += rows.shape[0]

    def _add_kron(self, v: LinearView, x: NDArray[Any]) -> None:
        x = np.asarray(x, dtype=np.float32)
        cov, pairs = tap_coverage(x.shape[2:], v.kernel, v.strides, v.pads, v.dilations)
        c = x.shape[1]
        pixels = np.moveaxis(x, 1, -1).reshape(-1, c)  # [N·P, C]
        root = np.sqrt(np.tile(cov.reshape(-1), x.shape[0]))[:, None]  # coverage counts are >= 0
        scaled = pixels * root
        a = np.empty((c + 1, c + 1))
        with self.blas.limit(limits=self.threads, user_api="blas"):  # Σ w·x xᵀ as a syrk, like _flush
            a[:c, :c] = scaled.T @ scaled
        a[:c, c] = a[c, :c] = (scaled * root).sum(axis=0, dtype=np.float64)
        a[c, c] = x.shape[0] * pairs
        patches = v.columns(x, TAP_ROWS_PER_BATCH, self.rngs[v.node], taps_first=True)  # [rows, k, C]
        flat = np.ascontiguousarray(patches.transpose(1, 0, 2)).reshape(v.block, -1)  # [k, rows·C]
        s = (flat @ flat.T).astype(np.float64)
        self.sums[v.node] = self.sums[v.node] + a if v.node in self.sums else a
        self.tap_sums[v.node] = self.tap_sums[v.node] + s if v.node in self.tap_sums else s
        self.count[v.node] += x.shape[0] * pairs

    def means(self) -> dict[str, Moments]:
        """The moments, handing the running sums over (divided in place, not copied: BERT-base's come to
        ~1 GB); the accumulator is empty afterwards."""
        for node in self.pending:
            self._flush(node)
        out: dict[str, Moments] = {}
        while self.sums:
            k, total = self.sums.popitem()
            total /= self.count[k]
            if k not in self.tap_sums:
                out[k] = total
                continue
            s = self.tap_sums.pop(k)
            scale = float(np.diagonal(s).mean())
            out[k] = Kron(total, s / scale if scale > 0 else np.eye(s.shape[0]))
        return out


def layer_moments(model: ModelProto, views: list[LinearView], feeds: Iterable[dict[str, NDArray[Any]]],
                  seed: int, samples: int = 0, progress: Callable[[float], None] | None = None,
                  arrays: runtime.Arrays | None = None) -> dict[str, Moments]:
    """E[[x; 1][x; 1]ᵀ] over each view's input columns: one onnxruntime pass, streamed batch by batch.
    (Running onnxruntime a batch ahead on a thread saved no wall time on ResNet-50 on 2 cores and
    cost 9 CPU-s more, measured: its intra-op threads already fill the second core.)"""
    acc = MomentSums(views, seed)
    sess = runtime.probe_session(model, acc.names, arrays)
    done = 0
    for batch in feeds:
        acc.add(runtime.run(sess, batch, acc.names))
        done += len(next(iter(batch.values())))
        if progress and samples:  # the pass is most of an OBS run: let users see it move
            progress(min(1.0, done / samples))
    return acc.means()


class LayerStatistics:
    """Each consumer's moments, computed on first request and kept.

    The OBS criterion asks for every consumer of a prunable group before selection; compensation then
    asks for the pruned ones and finds them here, so onnxruntime runs the statistics pass once."""

    def __init__(self, graph: DependencyGraph, specs: list[InputSpec], cfg: PruneConfig, kind: str = "mixed",
                 progress: Callable[[float], None] | None = None) -> None:
        self.graph, self.specs, self.cfg, self.kind, self.progress = graph, specs, cfg, kind, progress
        self.source = "identity" if cfg.hessian_source == "identity" else ""
        self.passes = 0
        self._cache: dict[str, Moments] = {}

    def get(self, views: list[LinearView]) -> dict[str, Moments]:
        """Each view's moments, Kronecker-factored (`obs.Kron`) for the views `factored` picks."""
        missing = [replace(v, kron=factored(v, self.cfg)) for v in views if v.node not in self._cache]
        if missing and self.source == "identity":
            self._cache.update({v.node: Kron(np.eye(v.keep.size + 1), np.eye(v.block)) if v.kron
                                else np.eye(v.matrix(self.graph.const(v.weight)).shape[1] + 1) for v in missing})
        elif missing:
            self.source, feeds = input_batches(self.graph.model, self.specs, self.cfg, self.kind, self.cfg.seed + 1)
            self._cache.update(layer_moments(self.graph.model, missing, feeds, self.cfg.seed, self.cfg.samples,
                                             self.progress, self.graph.known_const))
            self.passes += 1
        return {v.node: self._cache[v.node] for v in views}


def compensate(graph: DependencyGraph, removed_elem: NDArray[np.bool_], specs: list[InputSpec],
               cfg: PruneConfig, kind: str = "mixed", statistics: LayerStatistics | None = None) -> Compensation:
    """OBS-corrected weights (and biases) for every consumer that loses input channels, on the
    moments `statistics` holds already (or computes now).

    BLAS runs single-threaded here: multi-threaded OpenBLAS gives other bits in dgemm, inverses and
    solves (so the same prune would differ with the machine's load), and against a busy core its
    spinning workers lose more than they add (ResNet-50 OBS with one core busy elsewhere: 57 s with 2
    threads, 36 s with 1). The idle cores go where the bits do not depend on them: the statistics'
    Gram products (syrk, `MomentSums`) and independent layers side by side (`per_layer`)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _compensate(graph, removed_elem, statistics or LayerStatistics(graph, specs, cfg, kind), cfg)


def per_layer(fn: Callable[[LinearView], T], views: list[LinearView]) -> list[T]:
    """`fn` on every view, in order, on as many threads as there are idle cores: each layer's algebra
    is single-threaded BLAS (the same bits on any machine load), and numpy releases the GIL inside it,
    so layers run side by side instead."""
    workers = min(runtime.idle_cpus(), len(views))
    if workers <= 1:
        return [fn(v) for v in views]
    with ThreadPoolExecutor(workers, thread_name_prefix="graphprune-obs") as pool:
        return list(pool.map(fn, views))


def _compensate(graph: DependencyGraph, removed_elem: NDArray[np.bool_], statistics: LayerStatistics,
                cfg: PruneConfig) -> Compensation:
    start = time.perf_counter()
    views = linear_views(graph, removed_elem)
    if not views:
        return Compensation()
    stats = statistics.get(views)
    comp = Compensation(source=statistics.source)
    for fitted in per_layer(lambda v: _compensate_layer(graph, v, stats[v.node], cfg.damping), views):
        comp.overrides.update(fitted.overrides)
        comp.fits.append(fitted.fit)
        comp.layers.append(fitted.layer)
    comp.seconds = time.perf_counter() - start
    return comp


def augmented(graph: DependencyGraph, v: LinearView, h: Moments) -> tuple[NDArray[np.float64], Moments]:
    """[W | b] over the view's columns and the moments that go with it; a layer without a bias slot
    loses the constant row/column (nothing could absorb the removed channels' mean).

    Under a Kronecker-factored H the bias is the constant channel's k tap columns: b on the centre
    tap, zero elsewhere (the sum of those columns is what goes back into the bias)."""
    m = v.matrix(graph.const(v.weight))
    if isinstance(h, Kron):
        if not v.bias:
            return m, h.sub(np.arange(h.a.shape[0] - 1))
        const = np.zeros((m.shape[0], h.taps))
        const[:, h.taps // 2] = np.asarray(graph.const(v.bias), dtype=np.float64).reshape(-1)
        return np.hstack([m, const]), h
    if not v.bias:
        return m, h[:-1, :-1]
    return np.hstack([m, np.asarray(graph.const(v.bias), dtype=np.float64).reshape(-1, 1)]), h


def _restricted(h: Moments, columns: NDArray[np.int64]) -> Moments:
    return h.sub(h.channels(columns)) if isinstance(h, Kron) else h[np.ix_(columns, columns)]


@dataclass
class _Fitted:
    overrides: dict[str, NDArray[Any]]
    fit: tuple[LinearView, NDArray[np.float64]]
    layer: dict[str, Any]


def _compensate_layer(graph: DependencyGraph, v: LinearView, h: Moments, damping: float) -> _Fitted:
    w = graph.const(v.weight)
    aug, h = augmented(graph, v, h)
    remove = v.removed_columns()
    res = obs_remove(aug, h, remove, damping)
    kept = np.setdiff1d(np.arange(aug.shape[1]), remove)
    full = np.zeros_like(aug)
    full[:, kept] = res.weights
    columns = v.matrix(w).shape[1]
    overrides = {v.weight: v.unmatrix(full[:, :columns], w)}
    if v.bias:
        bias = graph.const(v.bias)
        # the constant's column, or under a factored H the sum of the constant channel's tap columns
        overrides[v.bias] = full[:, columns:].sum(axis=1).astype(bias.dtype).reshape(bias.shape)
    kron = isinstance(h, Kron)
    return _Fitted(overrides, (replace(v, kron=kron), full),
                   {"node": v.node, "op": v.op, "removed_inputs": int((~v.keep).sum()), "inputs": int(v.keep.size),
                    "hessian": "kron" if kron else "exact", "predicted_rel_error": res.error / (res.energy or 1.0)})


def measure_layers(graph: DependencyGraph, comp: Compensation, held_out: dict[str, Moments]) -> None:
    """Each corrected layer's relative output error tr(ΔA H₂ ΔAᵀ) / tr(A H₂ Aᵀ) on held-out moments H₂
    of its dense inputs, compensated and plainly pruned: where the fit generalises and where it does not.
    A layer fitted on factored moments is measured on factored H₂ too (its "hessian" says so)."""
    for (v, fitted), layer in zip(comp.fits, comp.layers, strict=True):
        aug, h2 = augmented(graph, v, held_out[v.node])
        removed = v.removed_columns()
        total = energy(aug, h2) or 1.0
        layer["measured_rel_error"] = energy(fitted - aug, h2) / total
        # plainly pruned, the error is just the removed columns' contribution
        layer["measured_rel_error_uncompensated"] = energy(aug[:, removed], _restricted(h2, removed)) / total
