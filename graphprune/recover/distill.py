"""Distillation: the pruned model (student) learns the dense model's (teacher's) outputs.

The teacher runs in onnxruntime (it needs no gradients); the student is the pruned graph's torch view,
whose trained weights are written back into the pruned model's own initializers. Class scores are
distilled with the temperature-softened KL divergence (a Softmax output on its input logits, whose
gradient does not vanish where probabilities saturate); every other float output with its squared
error relative to the teacher's energy, which needs no knowledge of its scale. Integer outputs carry
no gradient and are left out.

The stage cannot make a model worse silently: the best checkpoint by held-out loss is kept, and if the
held-out agreement with the dense model, measured in onnxruntime on the written-back model, falls below
the one-shot model's, the one-shot weights are returned and the report says why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from onnx import ModelProto
from torch import Tensor

from graphprune import runtime
from graphprune.config import PruneConfig
from graphprune.inputs import InputSpec
from graphprune.recover.data import Feeds, probe, training_inputs
from graphprune.recover.ops import Unsupported
from graphprune.recover.torchgraph import TorchGraph, weight_names, write_back
from graphprune.synthetic import dynamic_batch
from graphprune.validate import equivalent

CURVE_POINTS = 50  # loss curve samples kept for the report
EVALUATIONS = 10  # held-out checkpoints per run
WARMUP, WARMUP_STEPS = 0.05, 50  # the first 5% of the steps (at least 50) ramp the step size up
# A held-out loss 20% above the best one means the step size is too large for this model (a
# pretrained transformer diverges at the 3e-3 that suits small convnets): the best weights come back
# and the step size is divided by 3, at most MAX_BACKOFFS times.
BACKOFF, MAX_BACKOFFS = 1.2, 3
CLASS_SCORE_OPS = ("Softmax", "LogSoftmax")
UNINFORMATIVE = 0.9  # share of one answer among the teacher's synthetic-input class scores (_check_informative)


@dataclass(frozen=True)
class Target:
    """One distilled tensor: `name` in both models; class scores along `axis`, or plain values."""

    name: str
    classes: bool
    axis: int = -1


@dataclass
class Recovery:
    model: ModelProto
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Score:
    loss: float
    agreement: float  # top-1 agreement on class scores, cosine on values; mean over targets
    relative_error: float

    def to_dict(self) -> dict[str, float]:
        return {"loss": _sig(self.loss), "agreement": _sig(self.agreement), "relative_error": _sig(self.relative_error)}


def _sig(value: float) -> float:
    """Six significant digits: losses of well-matched models are tiny, rounding to places hides them."""
    return float(f"{value:.6g}")


def targets(model: ModelProto, outputs: dict[str, NDArray[Any]]) -> list[Target]:
    """What to distil for each float graph output (`outputs`: the teacher's values on one batch)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    found = []
    for name, value in outputs.items():
        if not np.issubdtype(value.dtype, np.floating) or value.ndim == 0:
            continue
        node = producers.get(name)
        while node is not None and node.op_type == "Identity":
            node = producers.get(node.input[0])
        if node is not None and node.op_type in CLASS_SCORE_OPS:
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
            if opset >= 13 or axis in (-1, value.ndim - 1):
                found.append(Target(node.input[0], True, axis))
                continue
        found.append(Target(name, value.ndim == 2 and value.shape[1] > 1))
    return found


def loss_fn(student: dict[str, Tensor], teacher: dict[str, Tensor], tgts: list[Target],
            temperature: float) -> Tensor:
    parts = []
    for t in tgts:
        s, ref = student[t.name], teacher[t.name]
        if t.classes:
            log_p = torch.log_softmax(ref / temperature, t.axis)
            log_q = torch.log_softmax(s / temperature, t.axis)
            kl = (log_p.exp() * (log_p - log_q)).sum(t.axis)
            parts.append(kl.mean() * temperature**2)
        else:
            parts.append(((s - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-12))
    return torch.stack(parts).mean()


def _agreement(student: dict[str, Tensor], teacher: dict[str, Tensor], tgts: list[Target]) -> tuple[float, float]:
    agree, num, den = [], 0.0, 0.0
    for t in tgts:
        s, ref = student[t.name].double(), teacher[t.name].double()
        if t.classes:
            agree.append(float((s.argmax(t.axis) == ref.argmax(t.axis)).double().mean()))
        else:
            a, b = s.reshape(len(s), -1), ref.reshape(len(ref), -1)
            agree.append(float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).mean()))
        num += float(((s - ref) ** 2).sum())
        den += float((ref**2).sum())
    return float(np.mean(agree)), num / den if den else 0.0


class _Teacher:
    """The dense model in onnxruntime, returning the distilled tensors."""

    def __init__(self, dense: ModelProto, tgts: list[Target] | None = None) -> None:
        self.dense = dense
        self.names = [o.name for o in dense.graph.output]
        self.session = runtime.session(dense, extra_outputs=[t.name for t in tgts or []])

    def __call__(self, feeds: Feeds, names: list[str]) -> dict[str, Tensor]:
        return {k: torch.from_numpy(v) for k, v in runtime.run(self.session, feeds, names).items()}


def _tensors(feeds: Feeds) -> dict[str, Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


def recover(dense: ModelProto, pruned: ModelProto, specs: list[InputSpec], cfg: PruneConfig,
            progress: Callable[[float], None] | None = None) -> Recovery:
    """Distil `pruned` from `dense` as `cfg` says; returns the model to keep and the report entry."""
    t0 = time.perf_counter()
    base = {"method": "distill", "steps_requested": cfg.steps_to_recover, "lr": cfg.recover_lr,
            "batch_requested": cfg.recover_batch, "temperature": cfg.recover_temperature}
    threads = torch.get_num_threads()
    torch.set_num_threads(runtime.cpus())
    try:
        return _recover(dense, pruned, specs, cfg, progress or (lambda f: None), base, t0)
    except Unsupported as exc:
        return Recovery(pruned, {**base, "applied": False, "skipped": str(exc),
                                 "seconds": round(time.perf_counter() - t0, 3)})
    finally:
        torch.set_num_threads(threads)


def _recover(dense: ModelProto, pruned: ModelProto, specs: list[InputSpec], cfg: PruneConfig,
             progress: Callable[[float], None], base: dict[str, Any], t0: float) -> Recovery:
    fixed = specs[0].shape[0] if not dynamic_batch(dense) and specs and specs[0].shape else None
    data = training_inputs(specs, cfg.calibration, cfg.recover_batch, fixed, cfg.seed)
    accumulate = data.shape.accumulate
    outputs = [o.name for o in dense.graph.output]
    tgts = targets(dense, runtime.run(runtime.session(dense), data.held_out[0], outputs))
    if not tgts:
        raise Unsupported("the model has no floating-point output to distil")
    names = [t.name for t in tgts]
    student = TorchGraph(pruned, weight_names(pruned))
    if not student.names:
        raise Unsupported("the pruned model has no trainable weights (Conv, Gemm, MatMul, norms, embeddings)")
    _verify(student, pruned, data.held_out[0])
    teacher = _Teacher(dense, tgts)
    held = [(_tensors(f), teacher(f, names)) for f in data.held_out]
    if data.train_samples is None:
        _check_informative([teacher(f, names) for f in probe(specs, fixed, cfg.seed)], tgts)

    def evaluate() -> _Score:
        with torch.no_grad():
            return _score([student(x, names) for x, _ in held], held, tgts, cfg.recover_temperature)

    before = _measure(pruned, held, tgts, cfg.recover_temperature)
    best_loss, best_step, best = evaluate().loss, 0, student.values()
    params = list(student.weights)
    opt = torch.optim.Adam(params, lr=cfg.recover_lr)
    steps, budget = cfg.steps_to_recover, cfg.recover_time
    curve: list[list[float | None]] = []
    losses: list[float] = []
    stopped, step, reported, scale, backoffs, checkpoints, since = "steps", 0, -1.0, 1.0, 0, 0, 0
    first_loss: float | None = None
    start = time.perf_counter()

    def fraction() -> float:
        """How much of the run is done: of its steps, or of its time budget if that runs out first."""
        return max(step / max(steps, 1), (time.perf_counter() - t0) / budget if budget else 0.0)

    while step < steps:
        done = fraction()
        expected = steps if not (budget and step) else min(steps, step / max(done, 1e-9))
        for group in opt.param_groups:
            group["lr"] = cfg.recover_lr * scale * _schedule(step, done, expected)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accumulate):
            feeds = next(data.train)
            loss = loss_fn(student(_tensors(feeds), names), teacher(feeds, names), tgts,
                           cfg.recover_temperature) / accumulate
            loss.backward()
            total += float(loss.detach())
        finite = math.isfinite(total)
        if finite:
            opt.step()
            first_loss = total if first_loss is None else first_loss
            losses.append(total)
        step += 1
        since += 1
        done = fraction()
        out_of_time = budget > 0 and done >= 1.0
        if not finite or out_of_time or step == steps or int(done * EVALUATIONS) > checkpoints:
            checkpoints = int(done * EVALUATIONS)
            held_loss = evaluate().loss if finite else math.inf
            if held_loss < best_loss:
                best_loss, best_step, best = held_loss, step, student.values()
            elif not held_loss <= BACKOFF * best_loss:  # blown up (or NaN): back to the best weights, smaller steps
                if backoffs == MAX_BACKOFFS:
                    stopped = "diverged"
                    break
                backoffs += 1
                scale /= 3.0
                student.load_values(best)
                opt = torch.optim.Adam(params, lr=cfg.recover_lr * scale)
            curve.append([step, _sig(float(np.mean(losses[-since:]))) if losses[-since:] else None,
                          _sig(held_loss) if math.isfinite(held_loss) else None])
            since = 0
        if done - reported >= 0.01:
            reported = done
            progress(min(done, 1.0))
        if out_of_time:
            stopped = "time"
            break
    train_s = time.perf_counter() - start
    recovered = write_back(pruned, best) if best_step else pruned
    after = _measure(recovered, held, tgts, cfg.recover_temperature) if best_step else before
    applied = best_step > 0 and (after.agreement > before.agreement or
                                 (after.agreement == before.agreement and after.loss <= before.loss))
    if best_step == 0:
        reason = "no checkpoint lowered the held-out loss: the one-shot weights are kept"
    elif not applied:
        reason = (f"held-out agreement fell from {before.agreement:.4f} to {after.agreement:.4f}: "
                  "the one-shot weights are kept")
    else:
        reason = ""
    report = {
        **base, "applied": applied, "reason": reason, "inputs": data.source,
        "batch": data.shape.micro * accumulate, "micro_batch": data.shape.micro,
        "train_inputs": data.train_samples, "held_out_inputs": sum(len(next(iter(f.values()))) for f in data.held_out),
        "targets": [{"tensor": t.name, "loss": "kl" if t.classes else "relative_mse"} for t in tgts],
        "trainable": {"tensors": len(student.names), "values": int(sum(p.numel() for p in params))},
        "steps": step, "stopped": stopped, "best_step": best_step,
        "lr_backoffs": backoffs, "final_lr_scale": scale,
        "loss": {"first": first_loss, "final": losses[-1] if losses else None},
        "curve": _thin(curve),
        "held_out": {"before": before.to_dict(), "after": after.to_dict()},
        "seconds": round(time.perf_counter() - t0, 3), "train_seconds": round(train_s, 3),
        "threads": torch.get_num_threads(),
    }
    return Recovery(recovered if applied else pruned, report)


def _schedule(step: int, done: float, expected_steps: float) -> float:
    """Linear warm-up over the first 5% of the steps (at least 50, at most a quarter of the run), then
    cosine decay to zero over the fraction of the run done (steps, or time with a budget)."""
    warm = max(1.0, min(max(WARMUP * expected_steps, WARMUP_STEPS), expected_steps / 4))
    return min(1.0, (step + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


def _thin(curve: list[list[float | None]]) -> list[list[float | None]]:
    if len(curve) <= CURVE_POINTS:
        return curve
    idx = np.linspace(0, len(curve) - 1, CURVE_POINTS).round().astype(int)
    return [curve[i] for i in idx]


def _check_informative(answers_by_batch: list[dict[str, Tensor]], tgts: list[Target]) -> None:
    """Synthetic inputs teach nothing where the dense model gives almost all of them one answer: PP-OCR
    rec predicts one answer ("blank") at 93% of the positions of synthetic lines (digits nets: 27-61% for their top
    class), and distilling on that took its character accuracy from .88 to 0 while the agreement on
    synthetic inputs rose. Such a model is left one-shot, with the reason."""
    for t in (t for t in tgts if t.classes):
        answers = torch.cat([ref[t.name].argmax(t.axis).reshape(-1) for ref in answers_by_batch])
        share = float(torch.bincount(answers).max()) / max(answers.numel(), 1)
        if share >= UNINFORMATIVE:
            raise Unsupported(f"on synthetic inputs the dense model gives {share:.0%} of the {answers.numel()} "
                              f"class scores of {t.name!r} the same answer, so distilling on them would teach that "
                              "one answer; give --calibration with a few hundred real inputs")


def _verify(view: TorchGraph, model: ModelProto, feeds: Feeds) -> None:
    """The view must compute what onnxruntime computes on the same model, or it is not trained."""
    with torch.no_grad():
        got = {k: v.numpy() for k, v in view(_tensors(feeds)).items()}
    ref = runtime.run(runtime.session(model), feeds)
    ok, worst = equivalent(ref, got)
    if not ok:
        raise Unsupported(f"the torch view of the pruned model differs from onnxruntime by {worst:.3g} (relative)")


def _measure(model: ModelProto, held: list[tuple[dict[str, Tensor], dict[str, Tensor]]], tgts: list[Target],
             temperature: float) -> _Score:
    """The held-out score of `model` as onnxruntime runs it (what the user gets)."""
    names = [t.name for t in tgts]
    sess = runtime.session(model, extra_outputs=names)
    outs = [{k: torch.from_numpy(v) for k, v in runtime.run(sess, {k: x.numpy() for k, x in feeds.items()},
                                                             names).items()} for feeds, _ in held]
    return _score(outs, held, tgts, temperature)


def _score(outs: list[dict[str, Tensor]], held: list[tuple[dict[str, Tensor], dict[str, Tensor]]],
           tgts: list[Target], temperature: float) -> _Score:
    """Loss, agreement and relative error of the outputs `outs` on the held-out batches."""
    loss = float(np.mean([float(loss_fn(s, t, tgts, temperature)) for s, (_, t) in zip(outs, held, strict=True)]))
    names = [t.name for t in tgts]
    agree, rel = _agreement({n: torch.cat([s[n] for s in outs]) for n in names},
                            {n: torch.cat([t[n] for _, t in held]) for n in names}, tgts)
    return _Score(loss, agree, rel)
