"""The whole library in two calls: `analyze` (groups and why) and `prune` (model + report).

The CLI, the service worker and the benchmarks call these and nothing deeper.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto

from graphprune import runtime
from graphprune.compensate import Compensation, HeldOutErrors, LayerStatistics, compensate, input_batches
from graphprune.config import PruneConfig
from graphprune.cost import CostModel, stored
from graphprune.depgraph import DependencyGraph
from graphprune.errors import TargetImpossibleError, UsageError
from graphprune.groups import Grouping, build_groups
from graphprune.importance import ScoringContext, criterion, group_scores
from graphprune.inputs import InputSpec, read_arrays, shape_warnings, signature
from graphprune.latency import SAMPLES, build_table, interleaved_ms
from graphprune.loading import load_model
from graphprune.model import save_model
from graphprune.normalize import normalize
from graphprune.passes import fold_batchnorms, fuse_hardswish, retie
from graphprune.report import Report
from graphprune.select import PrunePlan, Selector, control_flow
from graphprune.shapes import resolve_shapes
from graphprune.streams.stage import slice_streams
from graphprune.surgery import apply_plan, masked_reference
from graphprune.synthetic import batches, dynamic_batch
from graphprune.validate import Equivalence, Feeds, relative_error, tensor_dtypes, validate
from graphprune.weights import discard
from graphprune.widths import measured_multiples

Source = str | os.PathLike[str] | bytes | ModelProto
Progress = Callable[[str, float], None]
SELF_CHECK_BATCHES = 2
VALIDATION_SAMPLES = 64  # at least validate.TOP1_MIN_SAMPLES where the budgets allow
VALIDATION_BATCH = 16
VALIDATION_VALUES = 4_000_000  # input values validation holds (16 MB of float32)
# multiply-accumulates per model pass; validation runs each model once, the masked original once more:
# a ResNet-50 at 224x224 gets 4 samples, a 1B decoder at 32 tokens only its analysed batch, the demo 64
VALIDATION_MACS = 20_000_000_000


@dataclass
class Analysis:
    model: ModelProto  # normalized
    graph: DependencyGraph
    grouping: Grouping
    specs: list[InputSpec]
    cost: CostModel
    notes: list[str] = field(default_factory=list)  # how shapes were found, when not by strict inference

    @property
    def warnings(self) -> list[str]:
        """What the user should know before trusting the numbers: the input dims that were guessed, and
        shapes that came from a fallback."""
        return shape_warnings(self.specs) + self.notes

    def summary(self, members: bool = False) -> dict[str, Any]:
        groups = self.grouping.groups
        prunable = self.grouping.prunable
        return {
            "inputs": [{**_input(s), "dtype": str(s.dtype)} for s in self.specs],
            "warnings": self.warnings,
            "params": self.cost.params(),
            "flops": self.cost.macs(),
            "groups": {
                "total": len(groups),
                "prunable": len(prunable),
                "prunable_channels": sum(g.channels for g in prunable),
                "blocked_reasons": _reason_counts(groups),
                "list": [g.to_dict(members) for g in groups],
            },
        }


def _input(spec: InputSpec) -> dict[str, Any]:
    return {"name": spec.name, "shape": list(spec.shape), "source": spec.source}


def _reason_counts(groups: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for g in groups:
        if not g.prunable:
            for r in {r.kind.value for r in g.reasons} or {"single_unit"}:
                counts[r] = counts.get(r, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _config(config: PruneConfig | dict[str, Any] | None, overrides: dict[str, Any]) -> PruneConfig:
    base = asdict(config) if isinstance(config, PruneConfig) else dict(config or {})
    base.update(overrides)
    return PruneConfig.from_dict(base)


def analyze(source: Source, config: PruneConfig | dict[str, Any] | None = None, **overrides: Any) -> Analysis:
    cfg = _config(config, overrides)
    model = normalize(load_model(source, max_bytes=cfg.max_model_bytes), copy=False)
    specs = signature(model, {k: tuple(v) for k, v in cfg.input_shapes.items()})
    shapes = resolve_shapes(model, specs)
    graph = DependencyGraph.build(model, shapes, cfg.approximate_norms)
    grouping = build_groups(graph, cfg.exclude)
    wrapped = control_flow(graph)  # params and MACs inside If/Loop bodies are not counted either
    return Analysis(model, graph, grouping, specs, CostModel(graph, grouping.roots),
                    list(shapes.warnings) + ([wrapped] if wrapped else []))


@dataclass
class PruneResult:
    model: ModelProto
    report: Report
    plan: PrunePlan

    def save(self, path: str | os.PathLike[str]) -> None:
        save_model(self.model, path)


def prune(source: Source, config: PruneConfig | dict[str, Any] | None = None, *,
          progress: Progress | None = None, **overrides: Any) -> PruneResult:
    """Prune `source` as `config` says; raises a GraphpruneError subclass on any failure."""
    cfg = _config(config, overrides)
    step = progress or (lambda stage, frac: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str, frac: float) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now
        step(name, frac)

    an = analyze(source, cfg)
    lap("analyze", 0.3)
    work, run_cfg, streams = _streams_sliced(an, cfg)  # the model the groups are pruned on, and their target
    if streams:
        lap("streams", 0.33)
    # lazy: a pass runs only for what is asked, during scoring (obs criterion) or compensation
    window = [0.3, 0.4]
    statistics = LayerStatistics(work.graph, work.specs, cfg,
                                 progress=lambda f: step("statistics", window[0] + f * (window[1] - window[0])))
    crit = criterion(cfg.scoring)
    crit.prepare(ScoringContext(work.graph, work.grouping, work.specs, cfg, statistics))
    rng = np.random.default_rng(cfg.seed)
    scores = {g.id: group_scores(work.graph, g, crit, cfg.reduction, cfg.normalizer, rng)
              for g in work.grouping.prunable}
    lap("score", 0.4)
    selector = Selector(work.graph, work.grouping, scores, work.cost, run_cfg)
    latency: dict[str, Any] = {}
    if run_cfg.target == "latency" and run_cfg.sparsity > 0 and selector.cands:
        plan, latency = _toward_latency(an, work, selector, cfg, lambda f: step("latency table", 0.4 + 0.08 * f))
    else:
        plan = selector.select()
    lap("select", 0.5)
    plain = apply_plan(work.graph, plan.removed_root)
    pruned, comp = plain, Compensation()
    if cfg.compensate == "obs" and plan.removed:
        window[:] = [0.5, 0.7]
        comp = compensate(work.graph, plan.removed_root[work.grouping.roots], work.specs, cfg,
                          statistics=statistics)
        statistics.clear()  # the self-check's held-out pass is not fitted on them
        lap("compensate", 0.7)
        if comp.overrides:
            pruned = _self_checked(work, cfg, plain, plan.removed_root, comp)
    lap("surgery", 0.8)
    recovery: dict[str, Any] = {}
    if cfg.recover != "none" and (plan.removed or streams):
        pruned, recovery = _recovered(an, cfg, pruned, lambda f: step("recover", 0.8 + 0.15 * f))
        lap("recover", 0.95)
    # last, on the model that is returned: recovery trains the BNs' scale and shift as parameters of their
    # own, and validation then checks the folded model against the original (where `pruned` is `plain`,
    # the equivalence check sees the folded model too)
    graph = {"batchnorms_folded": fold_batchnorms(pruned)} if cfg.fold_bn else {}
    if cfg.fuse_activations:
        graph["hardswish_fused"] = fuse_hardswish(pruned)
    if work.graph.families:
        graph["shared_weights_tied"] = retie(pruned, work.graph.families)
    validation: dict[str, Any] = {}
    warnings = an.warnings
    approximate = _approximated(work, plan)
    if approximate:
        warnings.append(f"{len(approximate)} cross-channel normalization(s) now see fewer channels "
                        f"({', '.join(sorted(approximate)[:3])}{' ...' if len(approximate) > 3 else ''}): "
                        "an approximation (approximate_norms); the validation numbers measure its error")
    if cfg.validate:
        # an approximated norm computes other values on purpose: no exact masked model to agree with
        equivalence = None if approximate else Equivalence(
            masked_reference(work.graph, plan.removed_root, tensor_dtypes(work.model)), plain, work.model,
            work.graph.known_const)
        inputs, feeds, timing = _validation_feeds(an, cfg)
        validation, checks = validate(an.model, pruned, feeds, cfg.latency_runs, timing=timing,
                                      equivalence=equivalence, arrays=an.graph.known_const)
        validation["inputs"] = inputs
        if approximate:
            validation["equivalence"] = {"skipped": "approximate_norms changed what some norms compute"}
        warnings += checks
        lap("validate", 1.0)
    if pruned is not plain:
        discard(plain.graph.initializer)  # its scratch weights (a mapped model's) are not needed now
    report = _report(an, work, pruned, cfg, plan, selector.multiples, validation, timings)
    report.streams = streams
    report.latency = latency
    advice = latency_advice(validation.get("latency_ms") or {}, report.flops, cfg.multiple,
                            [g["units"] - g["removed"] for g in report.groups["pruned_list"]])
    report.warnings = warnings + ([advice] if advice else [])
    report.compensation = comp.to_dict()
    if statistics.passes:
        report.compensation["statistics"] = statistics.describe()
    report.importance = {"criterion": cfg.scoring, **crit.describe()}
    report.recovery = recovery
    report.graph = graph
    step("done", 1.0)
    return PruneResult(pruned, report, plan)


LATENCY_SLACK = 0.03  # measured kept latency within this share of the target: no correction
LATENCY_CORRECTIONS = 2


def _toward_latency(an: Analysis, work: Analysis, selector: Selector, cfg: PruneConfig,
                    progress: Callable[[float], None]) -> tuple[PrunePlan, dict[str, Any]]:
    """Select toward `cfg.sparsity` of the original's one-thread latency: on the table measured on the
    analysed model's layers, then measured end to end (the uncompensated pruned model against the
    original, interleaved) and the predicted target corrected where the two disagree, at most
    LATENCY_CORRECTIONS times; the plan measured closest to the target is kept."""
    feeds = next(iter(batches(an.specs, 1, None, "blobs", cfg.seed)))
    samples = [(p.removed_root, apply_plan(work.graph, p.removed_root)) for p in map(selector.local, SAMPLES)]
    selector.latency = table = build_table(work.graph, work.cost, samples, feeds, progress=progress)
    del samples
    goal = 1.0 - cfg.sparsity  # kept share of the original's latency
    base = selector.cfg
    aim = 1.0 - base.sparsity  # kept share of the predicted latency the selector aims at
    tries: list[dict[str, Any]] = []
    plans: list[PrunePlan] = []
    for _ in range(LATENCY_CORRECTIONS + 1):
        selector.cfg = replace(base, sparsity=min(max(1.0 - aim, 0.0), 0.99))
        try:
            plan = selector.select()
        except TargetImpossibleError:
            if not tries:
                raise
            break  # the correction asked for more than the limits allow: keep the closest so far
        dense_ms, pruned_ms = interleaved_ms([an.model, apply_plan(work.graph, plan.removed_root)], feeds,
                                             arrays=an.graph.known_const)
        tries.append({"aim": aim, "kept": pruned_ms / dense_ms, "measured_ms": round(pruned_ms, 3),
                      "predicted_ms": round(table.predict(plan.removed_root), 3), "dense_ms": round(dense_ms, 3)})
        plans.append(plan)
        if abs(tries[-1]["kept"] / goal - 1) <= LATENCY_SLACK:
            break
        aim = _next_aim(tries, goal)
    selector.cfg = base
    best = min(range(len(tries)), key=lambda i: abs(tries[i]["kept"] / goal - 1))
    plan, chosen = plans[best], tries[best]
    plan.achieved = 1.0 - chosen["kept"]
    return plan, {"target_ms": round(goal * chosen["dense_ms"], 3), "predicted_ms": chosen["predicted_ms"],
                  "measured_ms": chosen["measured_ms"], "dense_ms": chosen["dense_ms"],
                  "measured_over_target": round(chosen["kept"] / goal, 3), "threads": 1,
                  "selections": [{k: t[k] for k in ("predicted_ms", "measured_ms", "dense_ms")} for t in tries],
                  "table": table.describe()}


def _next_aim(tries: list[dict[str, Any]], goal: float) -> float:
    """The predicted share to aim at next: interpolated between the closest measured selections on either
    side of the goal, else scaled by how far the closest one missed."""
    below = [t for t in tries if t["kept"] < goal]
    above = [t for t in tries if t["kept"] >= goal]
    if below and above:
        lo = max(below, key=lambda t: t["kept"])
        hi = min(above, key=lambda t: t["kept"])
        if hi["kept"] > lo["kept"]:
            return float(lo["aim"] + (goal - lo["kept"]) * (hi["aim"] - lo["aim"]) / (hi["kept"] - lo["kept"]))
    closest = min(tries, key=lambda t: abs(t["kept"] - goal))
    return float(closest["aim"] * goal / closest["kept"])


REALIZED_FLOOR = 0.7  # speed-up over the ideal (1/MACs kept) under which the width advice is given
FAST_MULTIPLE = 8  # onnxruntime's CPU convs run in a blocked layout of 8 channels (NCHWc)


def latency_advice(latency: dict[str, Any], flops: dict[str, int], round_to: int | str,
                   widths: list[int]) -> str | None:
    """A warning when latency fell much less than MACs and the kept widths are not multiples of 8: odd
    widths fall off onnxruntime's NCHWc convolution layout (benchmarks/README.md, profile_latency.py:
    --round-to 8 took nine convnets from 0.63 to 0.85 of the ideal). Only on a measured, not noisy, ratio."""
    before, after = latency.get("before"), latency.get("after")
    if round_to == "auto" or int(round_to) % FAST_MULTIPLE == 0 or not (before and after and flops.get("before")) \
            or latency.get("noisy"):
        return None
    kept = flops["after"] / flops["before"]
    realized = before / after * kept
    odd = [w for w in widths if w % FAST_MULTIPLE]
    if realized >= REALIZED_FLOOR or not odd:
        return None
    return (f"latency fell {before / after:.2f}x for {1 / kept:.2f}x fewer MACs ({realized:.2f} of the ideal); "
            f"{len(odd)} pruned group(s) keep widths that are not multiples of {FAST_MULTIPLE} (e.g. {odd[0]}), "
            f"which onnxruntime's blocked convolution layout handles slowly: try --round-to auto (what this "
            f"machine's kernels prefer, measured) or --round-to {FAST_MULTIPLE}")


def _approximated(work: Analysis, plan: PrunePlan) -> set[str]:
    """The norms (node names) that see fewer channels because a pruned group passed through them."""
    return {r.node for g in work.grouping.groups if plan.count(g.id) for r in g.approximations}


def _streams_sliced(an: Analysis, cfg: PruneConfig) -> tuple[Analysis, PruneConfig, dict[str, Any]]:
    """With streams="rotate": the model with its RMSNorm / LayerNorm streams sliced, analysed again, and the target
    left for the groups (a params or MACs target counts what the streams already removed)."""
    if cfg.streams != "rotate":
        return an, cfg, {}
    sliced, entry = slice_streams(an.model, an.specs, cfg, an.graph.known_const)
    if sliced is None:
        return an, cfg, entry
    work = analyze(sliced, cfg, input_shapes={s.name: list(s.shape) for s in an.specs})
    if cfg.target == "channels":
        return work, cfg, entry
    # a latency target is shared out as MACs: what the streams save is then measured end to end
    measure = {"params": lambda a: a.cost.params(), "flops": lambda a: a.cost.macs(),
               "latency": lambda a: a.cost.macs()}[cfg.target]
    left = max(0.0, 1.0 - (1.0 - cfg.sparsity) * measure(an) / max(1, measure(work)))
    return work, replace(cfg, sparsity=left), entry


def _recovered(an: Analysis, cfg: PruneConfig, pruned: ModelProto,
               progress: Callable[[float], None]) -> tuple[ModelProto, dict[str, Any]]:
    """The recovery stage (graphprune[recover]); torch is imported only when it runs."""
    try:
        from graphprune.recover.distill import recover
    except ImportError as exc:
        raise UsageError(f"recovery needs PyTorch ({exc}): pip install 'graphprune[recover]' "
                         "(install the CPU build of torch first to avoid the multi-GB CUDA one)") from exc
    result = recover(an.model, pruned, an.specs, cfg, progress)
    return result.model, result.report


def _validation_feeds(an: Analysis, cfg: PruneConfig) -> tuple[str, list[Feeds], Feeds]:
    """(what they are, the batches fidelity is measured on, one batch at the analysed shape for latency).

    Inputs in the model's own domain, `_validation_samples` of them: the calibration file's last rows
    when one is given (the first ones fit the compensation), else smooth synthetic fields (fidelity on
    white noise says little about a compensated model), the first batch at the analysed shape (so both
    models run at the shape the user gave), the rest in batches of the model's fixed batch size or
    VALIDATION_BATCH."""
    analysed = next(iter(batches(an.specs, 1, None, "blobs", cfg.seed)))
    samples = _validation_samples(an)
    fixed = None if dynamic_batch(an.model) else _rows(an.specs)
    if cfg.calibration:
        arrays = read_arrays(cfg.calibration, an.specs)
        rows = min(next(iter(arrays.values())).shape[0], -(-samples // fixed) * fixed if fixed else samples)
        rows -= rows % fixed if fixed else 0
        size = fixed or VALIDATION_BATCH
        if rows:
            return "calibration", [{k: v[-rows:][i:i + size] for k, v in arrays.items()}
                                   for i in range(0, rows, size)], analysed
    rest = batches(an.specs, samples - _rows(an.specs), None if fixed else VALIDATION_BATCH, "blobs", cfg.seed + 1)
    return "synthetic:blobs", [analysed, *rest], analysed


def _validation_samples(an: Analysis) -> int:
    """Up to VALIDATION_SAMPLES, as far as VALIDATION_VALUES input values and VALIDATION_MACS per model
    pass allow; the batch at the analysed shape runs in any case (a large model: only that one)."""
    rows = _rows(an.specs)
    values = max(1, sum(math.prod(s.shape) for s in an.specs)) / rows
    macs = max(1, an.cost.macs()) / rows
    return max(1, min(VALIDATION_SAMPLES, int(VALIDATION_VALUES / values), int(VALIDATION_MACS / macs)))


def _rows(specs: list[InputSpec]) -> int:
    """Samples in one batch at the analysed shape (the first input's first dim)."""
    return specs[0].shape[0] if specs and specs[0].shape else 1


def _self_checked(an: Analysis, cfg: PruneConfig, plain: ModelProto, removed_root: NDArray[np.bool_],
                  comp: Compensation) -> ModelProto:
    """Keep the compensation only if it brings the outputs closer to the dense model on inputs it
    was not fitted on: a wrong H can be worse than none. The same dense run yields the corrected
    layers' held-out inputs, so each layer's error is measured there too."""
    compensated = apply_plan(an.graph, removed_root, comp.overrides)
    _, feeds = input_batches(an.model, an.specs, cfg, "blobs", cfg.seed + 7919)
    checks = list(itertools.islice(feeds, SELF_CHECK_BATCHES))
    held_out = HeldOutErrors(an.graph, comp, cfg.seed + 7919)
    outputs = [o.name for o in an.model.graph.output]
    dense = runtime.probe_session(an.model, held_out.names, an.graph.known_const)
    refs = []
    for batch in checks:
        acts = runtime.run(dense, batch, list(dict.fromkeys([*outputs, *held_out.names])))
        held_out.add(acts)
        refs.append({k: acts[k] for k in outputs})
    del dense  # one session at a time (each holds a model's weights)
    held_out.finish()
    err_plain, err_comp = (_mean_error(m, checks, refs) for m in (plain, compensated))
    comp.self_check = {"relative_error_uncompensated": err_plain, "relative_error_compensated": err_comp}
    comp.applied = err_comp <= err_plain
    if not comp.applied:
        discard(compensated.graph.initializer)
    return compensated if comp.applied else plain


def _mean_error(model: ModelProto, feeds: list[dict[str, NDArray[Any]]],
                refs: list[dict[str, NDArray[Any]]]) -> float:
    """`model`'s mean relative output error against the dense outputs `refs`, in a session of its own."""
    sess = runtime.session(model, timed=False)
    errors = [relative_error(ref, runtime.run(sess, batch)) for batch, ref in zip(feeds, refs, strict=True)]
    return sum(errors) / len(errors)


def _report(an: Analysis, work: Analysis, final: ModelProto, cfg: PruneConfig, plan: PrunePlan,
            multiples: dict[int, int], validation: dict[str, Any], timings: dict[str, float]) -> Report:
    """`an`: the model as given (the "before" numbers); `work`: what the groups were pruned on (the
    same model, or its streams sliced); `final`: the model written, whose initializers are the params
    and bytes "after" (folded BNs and compensation's added biases included); `multiples`: each group's
    width multiple, as selected."""
    params_after, bytes_after = stored(final)
    groups = work.grouping.groups
    auto = cfg.multiple == "auto"
    pruned_groups = [
        {"id": g.id, "producers": g.producers, "units": g.size, "removed": plan.count(g.id),
         **({"multiple": multiples[g.id]} if auto else {}),
         **({"approximate": [r.to_dict() for r in g.approximations]} if g.approximations else {})}
        for g in groups if plan.count(g.id)
    ]
    blocked = [g.to_dict(members=False) for g in groups if not g.prunable and g.reasons]
    graph = an.model.graph
    return Report(
        model={"nodes": len(graph.node), "opset": an.graph.opset, "ir_version": an.model.ir_version,
               "inputs": [_input(s) for s in an.specs],
               "outputs": [o.name for o in graph.output]},
        config=asdict(cfg),
        params={"before": an.cost.params(), "after": params_after},
        flops={"before": an.cost.macs(), "after": work.cost.macs(plan.removed_root)},
        bytes={"before": an.cost.bytes(), "after": bytes_after},
        groups={"total": len(groups), "prunable": len(work.grouping.prunable), "pruned": len(pruned_groups),
                "achieved": round(plan.achieved, 6), "pruned_list": pruned_groups, "blocked": blocked,
                **({"round_to_measured": measured_multiples()} if auto else {})},
        validation=validation,
        timings_s=timings,
    )
