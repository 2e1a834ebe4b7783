"""Data-free OBS compensation of every consumer of removed channels.

Statistics H = E[x xᵀ] of each consumer's input columns (plus the constant 1 for the bias) come from
the dense model run on synthetic inputs, or on the user's calibration .npz, streamed batch by batch
through onnxruntime with the consumers' inputs exposed as extra outputs. `LayerStatistics` computes
them within a memory budget and shares them between the OBS criterion and compensation. obs.py does
the math; the result is a set of replacement weights that surgery then slices.
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
# The default budget for held moments: this share of the memory available when a pass starts (a 1B
# decoder's 40 consumers hold 2.9 GB of float32 moments: one pass on a 24 GiB machine)
MEMORY_SHARE = 0.4
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
    go into one float32 Gram product added into a float32 sum (a few products each, summed where
    they are: float64 sums doubled the memory of a pass, 5.8 GB on a 1B decoder): a batch-1 ResNet-50
    gives its last stage 49 rows a batch, and a d² pass per 49 rows cost more than the product."""

    def __init__(self, views: list[LinearView], seed: int) -> None:
        self.views = views
        self.rngs = row_generators(views, seed)
        self.sums: dict[str, NDArray[Any]] = {}
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
        """Add the gathered rows' [x; 1] moments: one float32 GEMM (1.6x faster than float64); the
        constant column is the rows' sums (in float64), so no widened copy is made."""
        parts = self.pending[node]
        if not parts:
            return
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        parts.clear()
        d = rows.shape[1]
        if node not in self.sums:
            self.sums[node] = np.zeros((d + 1, d + 1), dtype=np.float32)
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
        self.sums[v.node] = self.sums[v.node] + a if v.node in self.sums else a  # float64: C² is small
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


def row_generators(views: list[LinearView], seed: int) -> dict[str, np.random.Generator]:
    """One generator per consumer for its sampled rows: what it samples does not depend on its company."""
    return {v.node: np.random.default_rng([seed, zlib.crc32(v.node.encode())]) for v in views}


def layer_moments(model: ModelProto, views: list[LinearView], feeds: Iterable[dict[str, NDArray[Any]]],
                  seed: int, samples: int = 0, progress: Callable[[float], None] | None = None,
                  arrays: runtime.Arrays | None = None, exposed: list[str] | None = None) -> dict[str, Moments]:
    """E[[x; 1][x; 1]ᵀ] over each view's input columns: one onnxruntime pass, streamed batch by batch.
    `exposed`: the activations the session returns (default: the views'); a pass over some views gives
    them the same bits as one over all when it exposes the same outputs (onnxruntime fuses differently
    around an exposed tensor). (Running onnxruntime a batch ahead on a thread saved no wall time on
    ResNet-50 on 2 cores and cost 9 CPU-s more, measured: its intra-op threads already fill the second core.)"""
    acc = MomentSums(views, seed)
    names = exposed or acc.names
    sess = runtime.probe_session(model, names, arrays)
    done = 0
    for batch in feeds:
        acc.add(runtime.run(sess, batch, names))
        done += len(next(iter(batch.values())))
        if progress and samples:  # the pass is most of an OBS run: let users see it move
            progress(min(1.0, done / samples))
    return acc.means()


def moment_bytes(v: LinearView) -> int:
    """About what a view's moments take while held: float32 (d+1)² exact, float64 factored."""
    if v.kron:
        return 8 * ((v.keep.size + 1) ** 2 + v.block**2)
    return 4 * (v.keep.size * v.block + 1) ** 2


class LayerStatistics:
    """Each consumer's moments, computed when first asked for and held while they fit a memory budget.

    The OBS criterion scores every consumer of a prunable group before selection; compensation then
    needs the pruned ones and finds them held, so onnxruntime runs the statistics pass once, when
    they all fit (`cfg.obs_memory` bytes, else MEMORY_SHARE of the available memory). When they do
    not, views are taken in chunks that fit, one pass each, and none are held: peak memory is the
    budget, whatever the model's depth, at the price of more passes. Every pass exposes the same
    activations and rows are sampled per consumer, so the moments, and the pruned model, are the
    same bits under any budget."""

    def __init__(self, graph: DependencyGraph, specs: list[InputSpec], cfg: PruneConfig, kind: str = "mixed",
                 progress: Callable[[float], None] | None = None) -> None:
        self.graph, self.specs, self.cfg, self.kind, self.progress = graph, specs, cfg, kind, progress
        self.source = "identity" if cfg.hessian_source == "identity" else ""
        self.passes = 0
        self.budget = cfg.obs_memory
        self._held: dict[str, Moments] = {}
        self._exposed: list[str] = []

    def each(self, views: list[LinearView], fn: Callable[[LinearView, Moments], T], keep: bool = True) -> list[T]:
        """`fn(view, moments)` for every view (on `per_layer`'s threads), in order; the view comes
        Kronecker-flagged as `factored` picks. `keep=False`: the last use, the moments are let go."""
        views = [replace(v, kron=factored(v, self.cfg)) for v in views]
        self._exposed = list(dict.fromkeys([*self._exposed, *(v.x for v in views)]))
        held = [v for v in views if v.node in self._held]
        todo = [v for v in views if v.node not in self._held]
        out = _apply(fn, held, self._held)
        if not keep:
            for v in held:
                del self._held[v.node]
        chunks = self._chunks(todo)
        for i, chunk in enumerate(chunks):
            moments = self._compute(chunk, i, len(chunks))
            out.update(_apply(fn, chunk, moments))
            if keep and len(chunks) == 1:
                self._held.update(moments)
        return [out[v.node] for v in views]

    def clear(self) -> None:
        self._held.clear()

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "passes": self.passes, "budget_bytes": self.budget}

    def _chunks(self, views: list[LinearView]) -> list[list[LinearView]]:
        """`views` in order, in chunks whose moments fit the budget beside what is held (all held
        moments are let go when that leaves no room); a view over the budget alone is a chunk alone."""
        if not views:
            return []
        if not self.budget:
            self.budget = max(1 << 28, int(MEMORY_SHARE * runtime.available_memory()))
        need = [moment_bytes(v) for v in views]
        if sum(need) + sum(_nbytes(h) for h in self._held.values()) > self.budget:
            self._held.clear()
        room = self.budget - sum(_nbytes(h) for h in self._held.values())
        chunks: list[list[LinearView]] = [[]]
        size = 0
        for v, b in zip(views, need, strict=True):
            if chunks[-1] and size + b > room:
                chunks.append([])
                size = 0
            chunks[-1].append(v)
            size += b
        return chunks

    def _compute(self, chunk: list[LinearView], index: int, count: int) -> dict[str, Moments]:
        if self.source == "identity":
            return {v.node: Kron(np.eye(v.keep.size + 1), np.eye(v.block)) if v.kron
                    else np.eye(v.matrix(self.graph.const(v.weight)).shape[1] + 1, dtype=np.float32) for v in chunk}
        self.source, feeds = input_batches(self.graph.model, self.specs, self.cfg, self.kind, self.cfg.seed + 1)
        report = self.progress
        progress = (lambda f: report((index + f) / count)) if report else None
        self.passes += 1
        return layer_moments(self.graph.model, chunk, feeds, self.cfg.seed, self.cfg.samples, progress,
                             self.graph.known_const, self._exposed)


def _apply(fn: Callable[[LinearView, Moments], T], views: list[LinearView], moments: dict[str, Moments]
           ) -> dict[str, T]:
    return dict(zip([v.node for v in views], per_layer(lambda v: fn(v, moments[v.node]), views), strict=True))


def _nbytes(h: Moments) -> int:
    return h.a.nbytes + h.s.nbytes if isinstance(h, Kron) else h.nbytes


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
    fits = statistics.each(views, lambda v, h: _compensate_layer(graph, v, h, cfg.damping), keep=False)
    comp = Compensation(source=statistics.source)
    for fitted in fits:
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
        if v.node not in held_out:
            continue
        aug, h2 = augmented(graph, v, held_out[v.node])
        removed = v.removed_columns()
        # plainly pruned, the error is just the removed columns' contribution
        _record(layer, energy(fitted - aug, h2), energy(aug[:, removed], _restricted(h2, removed)), energy(aug, h2))


def _record(layer: dict[str, Any], compensated: float, plain: float, total: float) -> None:
    layer["measured_rel_error"] = compensated / (total or 1.0)
    layer["measured_rel_error_uncompensated"] = plain / (total or 1.0)


class HeldOutErrors:
    """`measure_layers` on held-out inputs fed batch by batch, without d×d moments for the exact layers:
    their errors are summed from the sampled input rows X themselves, ‖X·ΔAᵀ‖² (the same number as
    tr(ΔA H₂ ΔAᵀ) on those rows; a 1B decoder's held-out moments took 5.8 GB). Factored layers are
    measured on factored moments (`MomentSums`)."""

    def __init__(self, graph: DependencyGraph, comp: Compensation, seed: int) -> None:
        self.graph, self.comp = graph, comp
        self.exact = [(v, fitted) for v, fitted in comp.fits if not v.kron]
        self.factored = MomentSums([v for v, _ in comp.fits if v.kron], seed)
        self.rngs = row_generators([v for v, _ in self.exact], seed)
        self.sums = {v.node: np.zeros(3) for v, _ in self.exact}  # compensated, plain, total error energy

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys([*(v.x for v, _ in self.exact), *self.factored.names]))

    def add(self, acts: dict[str, NDArray[Any]]) -> None:
        self.factored.add(acts)
        for v, fitted in self.exact:
            rows = v.columns(acts[v.x], MAX_ROWS_PER_BATCH, self.rngs[v.node])
            w = v.matrix(self.graph.const(v.weight))
            y = rows @ w.T.astype(np.float32)
            if v.bias:
                bias = np.asarray(self.graph.const(v.bias), dtype=np.float32).reshape(-1)
                y += bias
                y_fit = rows @ fitted[:, :-1].T.astype(np.float32) + fitted[:, -1].astype(np.float32)
            else:
                y_fit = rows @ fitted.T.astype(np.float32)
            removed = v.removed_columns()
            lost = rows[:, removed] @ w[:, removed].T.astype(np.float32)
            self.sums[v.node] += [_sq(y_fit - y), _sq(lost), _sq(y)]

    def finish(self) -> None:
        measure_layers(self.graph, self.comp, self.factored.means())
        for (v, _), layer in zip(self.comp.fits, self.comp.layers, strict=True):
            if v.node in self.sums:
                _record(layer, *self.sums[v.node].tolist())


def _sq(a: NDArray[np.float32]) -> float:
    flat = a.reshape(-1).astype(np.float64)
    return float(flat @ flat)
