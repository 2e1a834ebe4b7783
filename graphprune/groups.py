"""Groups: connected components of producer spaces whose channels are coupled.

A group holds units (the equivalence classes of coupled channel elements) and members (every
tensor dimension holding some of its positions: producer rows, consumer columns, norm vectors,
per-channel constants, activations). A unit coupled with anything fixed is blocked; a group with no
free unit left is not prunable and carries the typed reasons why.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
from numpy.typing import NDArray

from graphprune.depgraph import DependencyGraph
from graphprune.elements import Space
from graphprune.reasons import BlockKind, BlockReason


@dataclass
class Member:
    tensor: str
    axis: int
    role: str  # out | in | affine | bias | stat | const | act
    positions: NDArray[np.int64]  # positions of this dimension that belong to the group
    units: NDArray[np.int64]  # unit index (within the group) of each of those positions

    @property
    def is_param(self) -> bool:
        return self.role != "act"


@dataclass
class Group:
    id: int
    roots: NDArray[np.int64]  # one root element per unit
    blocked: NDArray[np.bool_]  # per unit
    spaces: list[Space]
    members: list[Member] = field(default_factory=list)
    reasons: list[BlockReason] = field(default_factory=list)
    # where removing its units changes what a cross-channel normalization computes (approximate_norms)
    approximations: list[BlockReason] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.roots.size)

    @property
    def free(self) -> int:
        return int((~self.blocked).sum())

    @property
    def prunable(self) -> bool:
        return self.free >= 2 and self.size >= 2

    @property
    def channels(self) -> int:
        return sum(s.size for s in self.spaces)

    @property
    def producers(self) -> list[str]:
        return sorted({s.node for s in self.spaces})

    def why_not(self) -> str:
        if self.prunable:
            return ""
        if self.reasons:
            return "; ".join(str(r) for r in self.reasons[:3])
        return "a single unit: nothing could be removed" if self.size < 2 else "all units are fixed"

    def to_dict(self, members: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "units": self.size,
            "free_units": self.free,
            "channels": self.channels,
            "prunable": self.prunable,
            "producers": self.producers,
            "reasons": [r.to_dict() for r in self.reasons],
        }
        if self.approximations:
            d["approximate"] = [r.to_dict() for r in self.approximations]
        if members:
            d["members"] = [
                {"tensor": m.tensor, "axis": m.axis, "role": m.role, "positions": int(m.positions.size)}
                for m in self.members
                if m.is_param
            ]
        return d


@dataclass
class Grouping:
    groups: list[Group]
    unit_group: dict[int, tuple[int, int]]  # root element -> (group id, unit index)
    roots: NDArray[np.int64]  # root of every element

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]


def build_groups(graph: DependencyGraph, exclude: list[str] | None = None) -> Grouping:
    pool = graph.pool
    roots = pool.roots()
    space_of = pool.space_of()
    blocked_root = np.zeros(len(pool), dtype=bool)
    blocked_root[roots[pool.blocked()]] = True

    links = nx.Graph()
    links.add_nodes_from(range(len(pool.spaces)))
    if len(pool):
        n = len(pool.spaces)
        codes = np.unique(space_of * n + space_of[roots])  # (space, root's space) pairs as one int64
        links.add_edges_from((a, b) for a, b in zip((codes // n).tolist(), (codes % n).tolist(), strict=True)
                             if a != b)

    groups: list[Group] = []
    unit_group: dict[int, tuple[int, int]] = {}
    space_group = np.zeros(len(pool.spaces), dtype=np.int64)
    for gid, comp in enumerate(sorted(nx.connected_components(links), key=min)):
        spaces = [pool.spaces[i] for i in sorted(comp)]
        elems = np.concatenate([np.arange(s.start, s.start + s.size) for s in spaces])
        group_roots = np.unique(roots[elems])
        for k, r in enumerate(group_roots.tolist()):
            unit_group[r] = (gid, k)
        for s in spaces:
            space_group[s.index] = gid
        groups.append(Group(gid, group_roots, blocked_root[group_roots], spaces))

    _attach_members(graph, groups, unit_group, roots, space_group, space_of)
    _attach_reasons(graph, groups, roots, space_group, space_of)
    if exclude:
        _exclude(groups, exclude)
    return Grouping(groups, unit_group, roots)


def _attach_members(graph: DependencyGraph, groups: list[Group], unit_group: dict[int, tuple[int, int]],
                    roots: NDArray[np.int64], space_group: NDArray[np.int64],
                    space_of: NDArray[np.int64]) -> None:
    unit_index = np.zeros(roots.size, dtype=np.int64)
    for r, (_, k) in unit_group.items():
        unit_index[r] = k
    for tensor, axes in graph.dims.items():
        for axis, labels in axes.items():
            label_roots = roots[labels]
            gids = space_group[space_of[label_roots]]
            role = graph.roles.get((tensor, axis), "act")
            for gid in np.unique(gids).tolist():
                positions = np.nonzero(gids == gid)[0]
                groups[gid].members.append(
                    Member(tensor, axis, role, positions, unit_index[label_roots[positions]]))


def _attach_reasons(graph: DependencyGraph, groups: list[Group], roots: NDArray[np.int64],
                    space_group: NDArray[np.int64], space_of: NDArray[np.int64]) -> None:
    for found, attr in ((graph.blocks, "reasons"), (graph.approximations, "approximations")):
        for labels, reason in found:
            for gid in np.unique(space_group[space_of[roots[labels]]]).tolist():
                listed = getattr(groups[gid], attr)
                if reason not in listed:
                    listed.append(reason)


def _exclude(groups: list[Group], patterns: list[str]) -> None:
    for group in groups:
        names = set(group.producers) | {m.tensor for m in group.members if m.is_param}
        hit = next((p for p in patterns for n in names if fnmatch.fnmatchcase(n, p)), None)
        if hit is not None:
            group.blocked[:] = True
            group.reasons.append(BlockReason(BlockKind.EXCLUDED, hit, "-", f"matches --exclude '{hit}'"))
