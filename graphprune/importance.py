"""Data-free importance of each unit of a group.

A weight criterion scores one member (one parameter dimension) per unit; the group score reduces the
members (mean/sum/max/prod, ignoring members that do not hold a unit) and is normalised within the
group so that global ranking compares groups of different scale. A criterion that needs the whole
model (the OBS error needs layer statistics) does its work in `prepare` and overrides `score_group`.
New criteria register here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import NodeProto
from threadpoolctl import threadpool_limits

from graphprune.compensate import LayerStatistics, augmented
from graphprune.config import PruneConfig
from graphprune.consumers import LinearView, linear_views
from graphprune.depgraph import Consume, DependencyGraph
from graphprune.errors import UsageError
from graphprune.groups import Group, Grouping, Member
from graphprune.inputs import InputSpec
from graphprune.obs import Moments, energy, removal_errors
from graphprune.onnxutil import node_name

Scores = NDArray[np.float64]


@dataclass
class ScoringContext:
    """What a model-level criterion may read; `statistics` is shared with compensation, so moments a
    criterion computes are not computed again after selection."""

    graph: DependencyGraph
    grouping: Grouping
    specs: list[InputSpec]
    cfg: PruneConfig
    statistics: LayerStatistics


class Criterion:
    """Scores per unit of a group (lower = removed first).

    The default scores members and reduces them; `roles` says which members it reads."""

    roles: frozenset[str] = frozenset({"out", "in", "affine"})

    def prepare(self, ctx: ScoringContext) -> None:
        """Model-level work before any group is scored (weight criteria need none)."""

    def describe(self) -> dict[str, Any]:
        """What the report should say about how scores were made (e.g. fallbacks)."""
        return {}

    def member_scores(self, weights: NDArray[Any], member: Member, n_units: int) -> Scores:
        raise NotImplementedError

    def score_group(self, graph: DependencyGraph, group: Group, reduction: str, normalizer: str,
                    rng: np.random.Generator) -> Scores:
        if not self.roles:
            return rng.random(group.size)
        rows = [self.member_scores(graph.const(m.tensor), m, group.size)
                for m in group.members if m.role in self.roles and graph.is_const(m.tensor)]
        if not rows:
            return self.without_members(graph, group, reduction, normalizer, rng)
        with np.errstate(all="ignore"):
            scores = np.nan_to_num(REDUCERS[reduction](np.stack(rows)), nan=0.0)
        return normalized(scores, normalizer)

    def without_members(self, graph: DependencyGraph, group: Group, reduction: str, normalizer: str,
                        rng: np.random.Generator) -> Scores:
        """Scores of a group holding none of the members this criterion reads."""
        return np.zeros(group.size)


CRITERIA: dict[str, Callable[[], Criterion]] = {}


def register_criterion(name: str) -> Callable[[type[Criterion]], type[Criterion]]:
    def deco(cls: type[Criterion]) -> type[Criterion]:
        CRITERIA[name] = cls
        return cls

    return deco


def position_norms(weights: NDArray[Any], axis: int, p: int) -> Scores:
    """|w|^p summed over every axis but `axis`: one value per position of that axis.

    Never converts whole weight tensors to float64 (that was a third of ResNet-50's pruning time,
    measured): p=2 is a float32 einsum over the trailing axes of a no-copy 3-D view, then float64
    sums (3-4x faster than squaring first), other powers are summed with float64 accumulation.
    """
    w = np.asarray(weights)
    if w.dtype.itemsize < 4 or not np.issubdtype(w.dtype, np.floating):
        w = w.astype(np.float32)  # float16 squares would overflow
    if p == 2:
        view = w.reshape(math.prod(w.shape[:axis]), w.shape[axis], -1)
        return np.einsum("anb,anb->an", view, view).sum(axis=0, dtype=np.float64)
    powered = np.abs(w) if p == 1 else np.abs(w) ** p
    return powered.sum(axis=tuple(i for i in range(w.ndim) if i != axis), dtype=np.float64)


def per_unit(values: Scores, member: Member, n_units: int) -> Scores:
    """Sum position values into units; units the member does not hold are NaN."""
    out = np.bincount(member.units, weights=values[member.positions], minlength=n_units).astype(np.float64)
    held = np.bincount(member.units, minlength=n_units) > 0
    out[~held] = np.nan
    return out


@register_criterion("l1")
class L1(Criterion):
    p = 1

    def member_scores(self, weights: NDArray[Any], member: Member, n_units: int) -> Scores:
        return per_unit(position_norms(weights, member.axis, self.p), member, n_units)


@register_criterion("l2")
class L2(L1):
    p = 2


@register_criterion("lamp")
class Lamp(L2):
    """LAMP: a unit's squared norm over the sum of the norms of all units at least as large."""

    def member_scores(self, weights: NDArray[Any], member: Member, n_units: int) -> Scores:
        s = super().member_scores(weights, member, n_units)
        held = ~np.isnan(s)
        vals = s[held]
        order = np.argsort(vals)
        tail = np.cumsum(vals[order][::-1])[::-1]
        lamp = np.empty_like(vals)
        lamp[order] = vals[order] / np.maximum(tail, 1e-30)
        s[held] = lamp
        return s


@register_criterion("bn")
class BNScale(Criterion):
    roles = frozenset({"affine"})

    def member_scores(self, weights: NDArray[Any], member: Member, n_units: int) -> Scores:
        return per_unit(position_norms(weights, member.axis, 1), member, n_units)

    def without_members(self, graph: DependencyGraph, group: Group, reduction: str, normalizer: str,
                        rng: np.random.Generator) -> Scores:
        """No BatchNorm in this group: magnitude instead."""
        return L2().score_group(graph, group, reduction, normalizer, rng)


@register_criterion("random")
class RandomScore(Criterion):
    roles = frozenset()


REDUCERS: dict[str, Callable[[NDArray[np.float64]], Scores]] = {
    "mean": lambda m: np.nanmean(m, axis=0),
    "sum": lambda m: np.nansum(m, axis=0),
    "max": lambda m: np.nanmax(m, axis=0),
    "prod": lambda m: np.nanprod(m, axis=0),
}
NORMALIZERS: dict[str, Callable[[Scores], float]] = {
    "mean": lambda s: float(np.mean(s)),
    "max": lambda s: float(np.max(s)),
    "sum": lambda s: float(np.sum(s)),
    "none": lambda s: 1.0,
}


def normalized(scores: Scores, normalizer: str) -> Scores:
    """Scores on the group's own scale, so global ranking compares groups of different magnitude."""
    scale = NORMALIZERS[normalizer](scores)
    return scores / scale if scale > 0 else scores


def criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise UsageError(f"unknown criterion {name!r}; choose one of {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]()


def group_scores(graph: DependencyGraph, group: Group, crit: Criterion, reduction: str, normalizer: str,
                 rng: np.random.Generator) -> Scores:
    """Score per unit of `group` (lower = removed first), comparable across groups."""
    return crit.score_group(graph, group, reduction, normalizer, rng)


@register_criterion("obs")
class ObsError(Criterion):
    """The OBS error of removing one unit, the rest of each consumer compensated: per consumer
    tr(W[:, M] (H⁻¹[M, M])⁻¹ W[:, M]ᵀ) on [W | b] and the damped moments compensation uses, divided
    by the consumer's output energy tr(W H Wᵀ) and summed over consumers (so `reduction` does not
    apply), then normalised within the group like every criterion's scores. These relative errors do
    not rank groups globally as they are: global ranking on them kept 0.43 of digits-ResNet's accuracy
    at -50% FLOPs (0.07 of PP-OCR's characters at -30%), 0.84 (0.86) after the default mean
    normalisation; only MiniLM ranked better raw (0.75 vs 0.69 cosine at -50%): `normalizer="none"`.

    A unit also feeding a consumer OBS cannot view (a cropping or very wide ConvTranspose, MatMul of two
    activations...) adds that consumer's magnitude share there, ‖W[:, M]‖² / ‖W‖² (its producers' rows
    where the consumer has no weight); consumers its channels pass through (grouped/depthwise Conv) are
    scored downstream.
    """

    def __init__(self) -> None:
        self.scores: dict[int, Scores] = {}
        self.info: dict[str, Any] = {}

    def prepare(self, ctx: ScoringContext) -> None:
        with threadpool_limits(limits=1, user_api="blas"):  # see compensate.compensate
            self.scores, self.info = _obs_scores(ctx)

    def describe(self) -> dict[str, Any]:
        return self.info

    def score_group(self, graph: DependencyGraph, group: Group, reduction: str, normalizer: str,
                    rng: np.random.Generator) -> Scores:
        if group.id not in self.scores:
            raise RuntimeError("the obs criterion scores groups after prepare() saw the model")
        return normalized(self.scores[group.id], normalizer)


def _free_roots(grouping: Grouping) -> NDArray[np.bool_]:
    """Per root element: whether its unit is a free unit of a prunable group."""
    free_root = np.zeros(grouping.roots.size, dtype=bool)
    for g in grouping.prunable:
        free_root[g.roots[~g.blocked]] = True
    return free_root


def _obs_scores(ctx: ScoringContext) -> tuple[dict[int, Scores], dict[str, Any]]:
    graph, grouping = ctx.graph, ctx.grouping
    scores = {g.id: np.zeros(g.size) for g in grouping.prunable}
    free_root = _free_roots(grouping)
    views = linear_views(graph, free_root[grouping.roots])
    for units, errors in ctx.statistics.each(views, lambda v, h: _view_errors(ctx, v, h, free_root)):
        for r, e in zip(units, errors, strict=True):
            gid, unit = grouping.unit_group[r]
            scores[gid][unit] += e
    nodes = {node_name(n): n for n in graph.model.graph.node}
    viewed = {v.node for v in views}
    by_group: dict[int, set[str]] = {}
    for c in graph.consumes:
        if c.node in viewed or _passes_through(graph, grouping, c, nodes[c.node]):
            continue
        for r in np.unique(grouping.roots[graph.tracked(c.tensor)[c.axis]]).tolist():
            if grouping.unit_group[r][0] in scores:
                by_group.setdefault(grouping.unit_group[r][0], set()).add(c.node)
    for gid, names in by_group.items():
        for n in sorted(names):
            scores[gid] += _magnitude_share(graph, grouping.groups[gid], nodes[n])
    info: dict[str, Any] = {"consumers_by_obs": len(views), "statistics_source": ctx.statistics.source}
    if by_group:
        fell_back = sorted(set().union(*by_group.values()))
        info["magnitude_fallback"] = {"groups": len(by_group),
                                      "consumers": [{"node": n, "op": nodes[n].op_type} for n in fell_back]}
    return scores, info


def _passes_through(graph: DependencyGraph, grouping: Grouping, c: Consume, node: NodeProto) -> bool:
    """Whether the consumed channels live on in the node's output (grouped or depthwise Conv, the head
    axis of attention products): their removal is then scored at the output's own consumers."""
    consumed = set(grouping.roots[graph.tracked(c.tensor)[c.axis]].tolist())
    return any(consumed & set(grouping.roots[labels].tolist())
               for o in node.output for labels in graph.tracked(o).values())


def _magnitude_share(graph: DependencyGraph, group: Group, node: NodeProto) -> Scores:
    """Each unit's share ‖W[:, M]‖² / ‖W‖² of a consumer's weight (of its producers' rows when the
    consumer has no constant weight): the OBS error on the same scale under H = I, uncompensated."""
    rows = [m for m in group.members if m.role == "in" and m.tensor in node.input and graph.is_const(m.tensor)]
    rows = rows or [m for m in group.members if m.role == "out" and graph.is_const(m.tensor)]
    shares = []
    for m in rows:
        norms = position_norms(graph.const(m.tensor), m.axis, 2)
        shares.append(np.nan_to_num(per_unit(norms, m, group.size) / (norms.sum() or 1.0)))
    return np.mean(shares, axis=0) if shares else np.zeros(group.size)


def _view_errors(ctx: ScoringContext, v: LinearView, h: Moments,
                 free_root: NDArray[np.bool_]) -> tuple[list[int], NDArray[np.float64]]:
    """Each free unit (root element) read by consumer `v`, and its relative OBS error there."""
    aug, h = augmented(ctx.graph, v, h)
    roots = ctx.grouping.roots[ctx.graph.tracked(v.x)[v.x_axis]]
    units = [r for r in np.unique(roots).tolist() if free_root[r]]
    blocks = [v.columns_of(np.nonzero(roots == r)[0]) for r in units]
    return units, removal_errors(aug, h, blocks, ctx.cfg.damping) / (energy(aug, h) or 1.0)
