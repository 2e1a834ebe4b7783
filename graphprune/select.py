"""Which units to remove: local (same ratio in every group) or global ranking, toward a target of
channels, parameters, MACs or latency, under per-group caps, a minimum width and round-to-multiple.

Toward latency the measured table (graphprune/latency.py) says how much a plan saves; units are ranked
by importance alone, as toward MACs: ranking by importance per millisecond saved cut the expensive
layers first and lost 10-20 points of accuracy at equal latency (benchmarks/accuracy/RESULTS.md)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from onnx import GraphProto

from graphprune.config import PruneConfig
from graphprune.cost import CostModel
from graphprune.depgraph import DependencyGraph
from graphprune.errors import TargetImpossibleError
from graphprune.groups import Group, Grouping
from graphprune.latency import LatencyTable
from graphprune.onnxutil import node_name
from graphprune.protowalk import subgraphs
from graphprune.widths import group_multiples

TOLERANCE = 0.005


@dataclass
class PrunePlan:
    removed: dict[int, NDArray[np.int64]]  # group id -> removed unit indices
    removed_root: NDArray[np.bool_]  # per element id: True where a removed unit's root
    achieved: float  # fraction of the target quantity removed

    def count(self, gid: int) -> int:
        return int(self.removed.get(gid, np.empty(0)).size)


def _max_removable(group: Group, cfg: PruneConfig) -> int:
    n = group.size
    keep_min = max(cfg.min_channels, math.ceil(n * (1 - cfg.max_group_sparsity) - 1e-9))
    return max(0, min(group.free, n - keep_min))


def _rounded(group: Group, k: int, multiple: int) -> int:
    """Largest removal <= k that keeps a multiple of `multiple` (or everything)."""
    n = group.size
    kept = n - k
    if multiple > 1 and kept % multiple:
        kept = min(n, math.ceil(kept / multiple) * multiple)
    return n - kept


def _lowest(scores: NDArray[np.float64], blocked: NDArray[np.bool_], k: int) -> NDArray[np.int64]:
    order = [int(i) for i in np.argsort(scores, kind="stable") if not blocked[i]]
    return np.array(sorted(order[:k]), dtype=np.int64)


class Selector:
    def __init__(self, graph: DependencyGraph, grouping: Grouping, scores: dict[int, NDArray[np.float64]],
                 cost: CostModel, cfg: PruneConfig) -> None:
        self.graph, self.grouping, self.scores, self.cost, self.cfg = graph, grouping, scores, cost, cfg
        self.multiples = group_multiples(graph, grouping, cfg.multiple)
        self.cands = [g for g in grouping.prunable if _max_removable(g, cfg) > 0]
        self.total_units = sum(g.size for g in grouping.prunable)
        self.latency: LatencyTable | None = None  # set before selecting toward a latency target

    def _plan(self, removed: dict[int, NDArray[np.int64]]) -> PrunePlan:
        removed_root = np.zeros(self.grouping.roots.size, dtype=bool)
        for gid, units in removed.items():
            removed_root[self.grouping.groups[gid].roots[units]] = True
        removed = self._keep_nonempty(removed, removed_root)
        return PrunePlan(removed, removed_root, 0.0)

    def _keep_nonempty(self, removed: dict[int, NDArray[np.int64]],
                       removed_root: NDArray[np.bool_]) -> dict[int, NDArray[np.int64]]:
        """No tensor may lose all its channels (a Split output holding only removed units)."""
        roots = self.grouping.roots
        for axes in self.graph.dims.values():
            for labels in axes.values():
                r = roots[labels]
                if r.size and removed_root[r].all():
                    best = max(np.unique(r).tolist(), key=lambda x: self._score_of(x))
                    removed_root[best] = False
                    gid, unit = self.grouping.unit_group[best]
                    removed[gid] = removed[gid][removed[gid] != unit]
        return removed

    def _score_of(self, root: int) -> float:
        gid, unit = self.grouping.unit_group[root]
        return float(self.scores[gid][unit])

    def local(self, ratio: float) -> PrunePlan:
        removed = {}
        for g in self.cands:
            k = min(math.floor(ratio * g.size + 1e-9), _max_removable(g, self.cfg))
            k = _rounded(g, k, self.multiples[g.id])
            if k > 0:
                removed[g.id] = _lowest(self.scores[g.id], g.blocked, k)
        return self._plan(removed)

    def global_(self, count: int) -> PrunePlan:
        entries = sorted(
            (float(self.scores[g.id][u]), g.id, u)
            for g in self.cands for u in range(g.size) if not g.blocked[u]
        )
        caps = {g.id: _max_removable(g, self.cfg) for g in self.cands}
        chosen: dict[int, list[int]] = {}
        taken = 0
        for _, gid, unit in entries:
            if taken >= count:
                break
            if len(chosen.setdefault(gid, [])) < caps[gid]:
                chosen[gid].append(unit)
                taken += 1
        removed = {}
        by_id = {g.id: g for g in self.cands}
        for gid, units in chosen.items():
            k = _rounded(by_id[gid], len(units), self.multiples[gid])
            if k > 0:
                removed[gid] = np.array(sorted(units[:k]), dtype=np.int64)
        return self._plan(removed)

    def _table(self) -> LatencyTable:
        if self.latency is None:
            raise RuntimeError("a latency target needs Selector.latency, the measured table")
        return self.latency

    def measure(self, plan: PrunePlan) -> float:
        if self.cfg.target == "channels":
            return sum(v.size for v in plan.removed.values()) / max(1, self.total_units)
        if self.cfg.target == "latency":
            table = self._table()
            return 1.0 - table.predict(plan.removed_root) / table.predict()
        fn: Callable[[NDArray[np.bool_] | None], int] = (
            self.cost.params if self.cfg.target == "params" else self.cost.macs)
        base = fn(None)
        return 1.0 - fn(plan.removed_root) / base if base else 0.0

    def select(self) -> PrunePlan:
        cfg = self.cfg
        if cfg.sparsity == 0:
            return self._plan({})
        if not self.cands:
            raise TargetImpossibleError(control_flow(self.graph) or (
                "no prunable group: every channel is coupled with something fixed "
                "(run `graphprune inspect` to see why each group is blocked)"))
        if cfg.target == "channels":
            plan = (self.global_(int(cfg.sparsity * self.total_units)) if cfg.global_ranking
                    else self.local(cfg.sparsity))
        else:
            plan = self._search()
        plan.achieved = self.measure(plan)
        return plan

    def _search(self) -> PrunePlan:
        """Smallest ratio (local) or count (global) whose exact cost reduction reaches the target."""
        make: Callable[[float], PrunePlan]
        if self.cfg.global_ranking:
            total = sum(_max_removable(g, self.cfg) for g in self.cands)
            make, lo, hi = (lambda x: self.global_(round(x * total))), 0.0, 1.0
        else:
            make, lo, hi = self.local, 0.0, 1.0
        best = make(hi)
        reach = self.measure(best)
        if reach < self.cfg.sparsity - TOLERANCE:
            raise TargetImpossibleError(
                f"at most {reach:.1%} of {self.cfg.target} can be removed under the current limits "
                f"(max_group_sparsity={self.cfg.max_group_sparsity}, min_channels={self.cfg.min_channels}, "
                f"round_to={self.cfg.multiple}); asked for {self.cfg.sparsity:.1%}: lower --sparsity, raise "
                "--max-group-sparsity or round to a smaller multiple")
        short = self._plan({})
        for _ in range(24):
            mid = (lo + hi) / 2
            plan = make(mid)
            if self.measure(plan) >= self.cfg.sparsity:
                hi, best = mid, plan
            else:
                lo, short = mid, plan
        if not self.cfg.global_ranking and self.measure(best) > self.cfg.sparsity + TOLERANCE:
            return self._fill(short) or best
        return best

    def _fill(self, short: PrunePlan) -> PrunePlan | None:
        """Rounded widths make local ratios a staircase (groups of 2^k channels kept at multiples of 16
        all step at once: -47% to -61% of the latency between two ratios). From the last plan short of the
        target, one group at a time takes its next rounded step, the group then least pruned first (the
        local ranking's uniform ratio); where that step reaches the target, of all groups' next steps the
        one overshooting least is taken."""
        counts = {g.id: short.count(g.id) for g in self.cands}
        by_id = {g.id: g for g in self.cands}
        goal = self.cfg.sparsity - TOLERANCE

        def plan(gid: int, k: int) -> PrunePlan:
            return self._plan({i: _lowest(self.scores[i], by_id[i].blocked, n)
                               for i, n in (counts | {gid: k}).items() if n})

        while True:
            steps = [(k / by_id[gid].size, gid, k) for gid, k in
                     ((gid, self._next_step(by_id[gid], c)) for gid, c in counts.items()) if k is not None]
            if not steps:
                return None
            _, gid, k = min(steps)
            if self.measure(plan(gid, k)) >= goal:
                reaching = [(m, p) for p in (plan(g, n) for _, g, n in steps) if (m := self.measure(p)) >= goal]
                return min(reaching, key=lambda mp: mp[0])[1]
            counts[gid] = k

    def _next_step(self, group: Group, removed: int) -> int | None:
        """The next removal count past `removed` that keeps a multiple of the group's width multiple,
        or None where the group may lose no more."""
        multiple = self.multiples[group.id]
        kept = (group.size - removed - 1) // multiple * multiple  # the next multiple below the width now
        k = group.size - kept
        return k if kept > 0 and k <= _max_removable(group, self.cfg) else None


def control_flow(graph: DependencyGraph) -> str | None:
    """Why nothing is prunable when the computation sits in If/Loop/Scan bodies, which are never
    rewritten: "coupled with something fixed" would send the user looking for the wrong cause."""
    bodies = [(n, sub) for n in graph.model.graph.node for sub in subgraphs(n)]
    inside = sum(_node_count(sub) for _, sub in bodies)
    if not bodies or inside < len(graph.model.graph.node):
        return None
    names = ", ".join(sorted({f"{n.op_type} '{node_name(n)}'" for n, _ in bodies})[:3])
    return (f"the graph is control flow: {inside} of its {inside + len(graph.model.graph.node)} nodes are inside "
            f"the bodies of {names}, which graphprune does not rewrite; export the model without control flow "
            "(trace it with fixed inputs, or fold the branch, e.g. onnxsim, when its condition is constant)")


def _node_count(graph: GraphProto) -> int:
    return sum(1 + sum(_node_count(sub) for sub in subgraphs(n)) for n in graph.node)
