"""Validation with onnx.checker and onnxruntime: the pruned model must load, run, keep every output's
name and shape, and (without compensation) equal the masked original, which proves the coupling."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import ModelProto

from graphprune import runtime
from graphprune.errors import InvalidModelError, ValidationFailedError
from graphprune.model import inference_view
from graphprune.tensors import size_mismatches, tensor_nbytes

EQUIVALENCE_RTOL = 1e-3
EQUIVALENCE_ATOL = 1e-4
TOP1_MIN_SAMPLES = 32  # below, top-1 agreement moves in steps of 3% or more and is not reported
NEAR_ZERO = 1e-6  # an output whose largest |value| is below this carries no signal to compare
NEAR_CONSTANT = 1e-3  # ... nor one whose std is below this fraction of its mean |value|
MIN_LATENCY_RUNS = 3  # fewer runs give no spread to judge a ratio by
INTERLEAVE_MAX_BYTES = 1 << 30  # weights of both models above which they are timed one after the other
MAX_OUTPUT_VALUES = 1 << 24  # reference output values kept for comparison (64 MB of float32)
Feeds = dict[str, NDArray[Any]]


def check(model: ModelProto) -> None:
    """onnx.checker (full check: strict shape inference) on the weightless view, plus each weight's
    byte count against its shape.

    The view keeps every node, attribute and declared weight shape, so the checker sees the same
    graph; what it does not get is the weight bytes, which it would only serialize (2.3 s for
    BERT-base, 0.03 s for its view, measured) and whose sizes are checked here instead.
    """
    try:
        onnx.checker.check_model(inference_view(model), full_check=True)
    except Exception as exc:
        raise ValidationFailedError(f"the pruned model fails onnx.checker: {exc}") from exc
    for _, tensor, held, need in size_mismatches((f"initializer {t.name!r}", t) for t in model.graph.initializer):
        raise ValidationFailedError(
            f"the pruned model fails onnx.checker: initializer '{tensor.name}' holds {held} "
            f"bytes, its shape {list(tensor.dims)} needs {need}")


def tensor_dtypes(model: ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(inference_view(model), strict_mode=False)
    g = inferred.graph
    out = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


class Agreement:
    """One output's agreement between the original model (`ref`) and the pruned one (`got`), summed
    batch by batch so no batch's outputs need to be kept, and whether the numbers mean anything:
    an output that is near zero or near constant on the validation inputs has cosine ~1 whatever the
    pruning did, one value per sample has cosine 1 by construction, and top-1 agreement on a handful
    of samples is a coin toss."""

    def __init__(self, name: str, first: NDArray[Any]) -> None:
        self.name, self.shape = name, list(first.shape)
        self.floating = bool(np.issubdtype(first.dtype, np.floating))
        self.per_sample = first.size // first.shape[0] if first.ndim and first.shape[0] else first.size
        self.classes = first.ndim == 2 and first.shape[1] > 1
        # sums of (value - shift): the spread of a near-constant output would cancel out in raw sums
        self.shift = float(first.astype(np.float64).mean()) if self.floating and first.size else 0.0
        self.count = self.equal = self.rows = self.top1 = 0
        self.max_diff = self.max_ref = self.dot = self.ref_sq = self.got_sq = 0.0
        self.sum = self.sum_sq = self.sum_abs = 0.0

    def add(self, ref: NDArray[Any], got: NDArray[Any]) -> None:
        self.count += ref.size
        if not self.floating:
            self.equal += int((ref == got).sum())
            return
        a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        if a.size:
            self.max_diff = max(self.max_diff, float(np.abs(a - b).max()))
            self.max_ref = max(self.max_ref, float(np.abs(a).max()))
        self.dot += float(a @ b)
        self.ref_sq += float(a @ a)
        self.got_sq += float(b @ b)
        centred = a - self.shift
        self.sum += float(centred.sum())
        self.sum_sq += float(centred @ centred)
        self.sum_abs += float(np.abs(a).sum())
        if self.classes:
            self.rows += ref.shape[0]
            self.top1 += int((ref.argmax(1) == got.argmax(1)).sum())

    def row(self) -> tuple[dict[str, Any], list[str]]:
        """The report row and the warnings that qualify it."""
        row: dict[str, Any] = {"output": self.name, "shape": self.shape}
        if not self.floating:
            row["exact_match"] = self.equal / self.count if self.count else 1.0
            return row, []
        denom = float(np.sqrt(self.ref_sq * self.got_sq))
        row.update(max_abs_err=self.max_diff, max_rel_err=self.max_diff / self.max_ref if self.max_ref else 0.0,
                   cosine=None if self.per_sample <= 1 else self.dot / denom if denom else 1.0,
                   values_per_sample=self.per_sample)
        warnings = []
        n = max(self.count, 1)
        std = float(np.sqrt(max(0.0, self.sum_sq / n - (self.sum / n) ** 2)))
        mean_abs = self.sum_abs / n
        weak = "so its cosine and errors say little about fidelity; validate on real inputs with --calibration FILE.npz"
        if self.max_ref < NEAR_ZERO:
            row["degenerate"] = "near_zero"
            warnings.append(f"output '{self.name}' of the original model is near zero on the validation inputs "
                            f"(max |value| {self.max_ref:.2g}), {weak}")
        elif std <= NEAR_CONSTANT * mean_abs:
            row["degenerate"] = "near_constant"
            warnings.append(f"output '{self.name}' of the original model is nearly constant on the validation inputs "
                            f"(std {std:.2g} against mean |value| {mean_abs:.2g}), {weak}")
        if self.classes:
            row["top1_agreement"] = self.top1 / self.rows if self.rows >= TOP1_MIN_SAMPLES else None
            if row["top1_agreement"] is None:
                warnings.append(f"top-1 agreement of output '{self.name}' is not reported: validation ran "
                                f"{self.rows} sample(s), fewer than the {TOP1_MIN_SAMPLES} it needs")
        return row, warnings


def relative_error(ref: dict[str, NDArray[Any]], got: dict[str, NDArray[Any]]) -> float:
    """Σ‖got − ref‖² / Σ‖ref‖² over the floating-point outputs."""
    num = den = 0.0
    for name, r in ref.items():
        if np.issubdtype(r.dtype, np.floating):
            a = r.astype(np.float64)
            num += float(((got[name].astype(np.float64) - a) ** 2).sum())
            den += float((a**2).sum())
    return num / den if den else 0.0


def equivalent(ref: dict[str, NDArray[Any]], got: dict[str, NDArray[Any]]) -> tuple[bool, float]:
    """Same outputs within float tolerance (accumulation order changes with fewer channels)."""
    worst = 0.0
    ok = True
    for name, r in ref.items():
        g = got[name]
        if not np.issubdtype(r.dtype, np.floating):
            ok &= bool(np.array_equal(r, g))
            continue
        a, b = r.astype(np.float64), g.astype(np.float64)
        scale = max(1.0, float(np.abs(a).max()) if a.size else 1.0)
        err = float(np.abs(a - b).max()) if a.size else 0.0
        worst = max(worst, err / scale)
        ok &= err <= EQUIVALENCE_ATOL + EQUIVALENCE_RTOL * scale
    return ok, worst


def run_times(sessions: list[ort.InferenceSession], feeds: Feeds, runs: int) -> list[list[float]]:
    """`runs` timed runs of each session in turn (a, b, a, b, ...) after a warm-up run each: load from
    other processes then falls on every model alike instead of on whichever ran during it."""
    for sess in sessions:
        runtime.run(sess, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for sess, spent in zip(sessions, times, strict=True):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            spent.append((time.perf_counter() - t0) * 1e3)
    return times


def latency(before: list[float], after: list[float], threads: int, interleaved: bool) -> dict[str, Any]:
    """Medians and interquartile ranges of each model's run times; `noisy` where the ranges overlap
    (or there are too few runs for a range): the ratio of the medians is then not evidence."""
    q = {k: np.percentile(v, [25, 50, 75]) for k, v in (("before", before), ("after", after))}
    overlap = q["before"][0] <= q["after"][2] and q["after"][0] <= q["before"][2]
    return {"before": float(q["before"][1]), "after": float(q["after"][1]), "runs": len(before),
            "threads": threads, "spread_ms": {k: float(v[2] - v[0]) for k, v in q.items()},
            "noisy": bool(overlap or len(before) < MIN_LATENCY_RUNS), "interleaved": interleaved}


def _interleaved(original: ModelProto, pruned: ModelProto) -> bool:
    """Whether both timed sessions may be alive at once: each holds its model's weights plus a
    pre-packed copy, so above INTERLEAVE_MAX_BYTES of weights (or a quarter of the free memory) each
    model is timed in a phase of its own, and load that changes between the phases shows in the ratio."""
    weights = sum(tensor_nbytes(t) for m in (original, pruned) for t in m.graph.initializer)
    return weights <= min(INTERLEAVE_MAX_BYTES, runtime.available_memory() // 4)


def _reference(sess: ort.InferenceSession, feeds: Sequence[Feeds]) -> list[dict[str, NDArray[Any]]]:
    """The original's outputs on `feeds`, stopping once they hold MAX_OUTPUT_VALUES (at least one batch):
    they are kept until the pruned model has run, and a decoder's logits are large."""
    refs: list[dict[str, NDArray[Any]]] = []
    for batch in feeds:
        refs.append(runtime.run(sess, batch))
        if sum(v.size for r in refs for v in r.values()) >= MAX_OUTPUT_VALUES:
            break
    return refs


def _rows(feeds: Feeds) -> int:
    first = next(iter(feeds.values()), None)
    return first.shape[0] if first is not None and first.ndim else 1


@dataclass
class Equivalence:
    """The masked model (`surgery.masked_reference`: masks only, it runs on `weights`' initializers,
    with `arrays` those already in memory) and the uncompensated pruned one, which must agree."""

    reference: ModelProto
    plain: ModelProto
    weights: ModelProto
    arrays: runtime.Arrays | None = None


def validate(original: ModelProto, pruned: ModelProto, feeds: Sequence[Feeds], latency_runs: int, *,
             timing: Feeds | None = None, equivalence: Equivalence | None = None,
             arrays: runtime.Arrays | None = None) -> tuple[dict[str, Any], list[str]]:
    """Run every check; raise ValidationFailedError on anything that makes the model unusable. Returns
    the validation section and the warnings on how far its numbers can be trusted.

    Fidelity is measured over the batches `feeds`, latency on `timing` (default: the first batch):
    `latency_runs` runs of each model, interleaved when both sessions fit in memory together. Timed
    sessions spin between runs as in deployment: without it a small model's runs are mostly thread
    wake-ups (the demo on 2 shared cores: 0.12 vs 0.15 ms, spreads overlapping; spinning 0.098 vs 0.070 ms).
    `equivalence`: the masked model and the uncompensated pruned one must agree exactly on the first
    batch, which proves the coupling; compensation then changes the kept weights on purpose. `arrays`:
    the original's weights already in memory (`DependencyGraph.known_const`), shared by its sessions.
    """
    check(pruned)
    timing = feeds[0] if timing is None else timing
    timed = latency_runs > 0
    together = timed and _interleaved(original, pruned)
    sess = runtime.session(original, timed=timed, spinning=timed, arrays=arrays)
    refs = _reference(sess, feeds)
    feeds = feeds[:len(refs)]
    threads = int(sess.get_session_options().intra_op_num_threads)
    times: dict[str, list[float]] = {}
    if together:
        runtime.run(sess, timing)  # the original must run at the timing shape before the pruned one is blamed
    elif timed:
        times["before"] = run_times([sess], timing, latency_runs)[0]
    kept = sess if together else None
    del sess  # unless both are timed together, one model's weights at a time
    try:
        pruned_sess = runtime.session(pruned, timed=timed, spinning=timed)
        agreements: dict[str, Agreement] = {}
        first: dict[str, NDArray[Any]] = {}
        for batch, ref in zip(feeds, refs, strict=True):
            got = runtime.run(pruned_sess, batch)
            first = first or got
            for name, r in ref.items():
                if got[name].shape != r.shape:
                    raise ValidationFailedError(f"output '{name}' changed shape {r.shape} -> {got[name].shape}")
                if name not in agreements:
                    agreements[name] = Agreement(name, r)
                agreements[name].add(r, got[name])
        if kept is not None:
            times["before"], times["after"] = run_times([kept, pruned_sess], timing, latency_runs)
        elif timed:
            times["after"] = run_times([pruned_sess], timing, latency_runs)[0]
    except InvalidModelError as exc:
        raise ValidationFailedError(f"the pruned model does not run in onnxruntime: {exc}") from exc
    del kept, pruned_sess, refs
    rows, warnings = [], []
    for agreement in agreements.values():
        row, notes = agreement.row()
        rows.append(row)
        warnings.extend(notes)
    result: dict[str, Any] = {
        "checker": "passed",
        "onnxruntime": "passed",
        "samples": sum(_rows(batch) for batch in feeds),
        "outputs": rows,
        "latency_ms": latency(times["before"], times["after"], threads, together) if timed
        else {"before": None, "after": None, "runs": 0},
    }
    if equivalence is not None:
        eq = equivalence
        masked = runtime.run(runtime.session(eq.reference, timed=False, weights=eq.weights, arrays=eq.arrays),
                             feeds[0])
        plain = first if eq.plain is pruned else runtime.run(runtime.session(eq.plain, timed=False), feeds[0])
        ok, worst = equivalent(masked, plain)
        result["equivalence"] = {"passed": ok, "max_rel_err": worst}
        if not ok:
            raise ValidationFailedError(
                f"internal coupling error: the pruned model differs from the masked original by {worst:.3g} "
                "(relative); no model was written. Please report this model; --exclude the affected layers "
                "as a workaround")
    return result, warnings
