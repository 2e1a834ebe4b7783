"""Which units to remove: local (same ratio in every group) or global ranking, toward a target of
channels, parameters, MACs or latency, under per-group caps, a minimum width and round-to-multiple.

Toward latency the measured table (graphprune/latency.py) says how much a plan saves; units are ranked
by importance alone, as toward MACs: ranking by importance per millisecond saved cut the expensive
layers first and lost 10-20 points of accuracy at equal latency (benchmarks/accuracy/RESULTS.md)."""

from __future__ import annotations

import functools
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
        self.by_id = {g.id: g for g in self.cands}
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
        """The least important steps across groups until `count` units go. A step is the units a group
        loses when it takes its next rounded width (one unit at round-to 1), ranked by its most important
        unit, so a step goes once all its units would have gone ranked one by one; but units that rounding
        would keep no longer count toward `count` (the search then took more elsewhere). By the mean
        instead, a few near-zero units carried important ones out: PP-OCRv4 rec at -30% MACs with auto
        widths .876 against .930 (benchmarks/accuracy/seeds.py, median of 4 seeds)."""
        counts: dict[int, int] = {}
        taken = 0
        for _, gid, k in self._steps:
            if taken >= count:
                break
            taken += k - counts.get(gid, 0)
            counts[gid] = k
        return self._counted(counts)

    @functools.cached_property
    def _steps(self) -> list[tuple[float, int, int]]:
        """(top score among the step's units, group id, removal count after it), least important first;
        a group's steps come in their order, as its units are taken lowest first."""
        steps = []
        for g in self.cands:
            order = [int(i) for i in np.argsort(self.scores[g.id], kind="stable") if not g.blocked[i]]
            done = 0
            while (k := self._next_step(g, done)) is not None:
                steps.append((float(self.scores[g.id][order[k - 1]]), g.id, k))
                done = k
        return sorted(steps)

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
        if self.measure(best) > self.cfg.sparsity + TOLERANCE:
            counts = {g.id: short.count(g.id) for g in self.cands}
            return (self._closest(counts) if self.cfg.global_ranking else self._fill(counts)) or best
        return best

    def _fill(self, counts: dict[int, int]) -> PrunePlan | None:
        """Rounded widths make local ratios a staircase (groups of 2^k channels kept at multiples of 16
        all step at once: -47% to -61% of the latency between two ratios). From the removal `counts` of the
        last plan short of the target, one group at a time takes its next rounded step, the group then
        least pruned first (the local ranking's uniform ratio), until one step would reach the target."""
        while steps := self._next_steps(counts):
            _, gid, k = min(steps)
            if self.measure(self._with(counts, gid, k)) >= self.cfg.sparsity - TOLERANCE:
                return self._closest(counts)
            counts[gid] = k
        return None

    def _closest(self, counts: dict[int, int]) -> PrunePlan | None:
        """Of every group's next rounded step from `counts`, the plan that reaches the target overshooting
        least: a whole step of a narrow group can remove several points more than was asked (the demo net's
        16-wide groups at multiple 8: -53% of its parameters where -40% was asked)."""
        goal = self.cfg.sparsity - TOLERANCE
        reaching = [(m, p) for p in (self._with(counts, g, k) for _, g, k in self._next_steps(counts))
                    if (m := self.measure(p)) >= goal]
        return min(reaching, key=lambda mp: mp[0])[1] if reaching else None

    def _next_steps(self, counts: dict[int, int]) -> list[tuple[float, int, int]]:
        """(share of the group removed after it, group id, removal count) of each group's next step."""
        return [(k / self.by_id[gid].size, gid, k) for gid, k in
                ((gid, self._next_step(self.by_id[gid], c)) for gid, c in counts.items()) if k is not None]

    def _with(self, counts: dict[int, int], gid: int, k: int) -> PrunePlan:
        return self._counted(counts | {gid: k})

    def _counted(self, counts: dict[int, int]) -> PrunePlan:
        """The plan removing each group's `counts[gid]` least important units."""
        return self._plan({gid: _lowest(self.scores[gid], self.by_id[gid].blocked, k)
                           for gid, k in counts.items() if k})

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
