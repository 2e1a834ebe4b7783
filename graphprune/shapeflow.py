"""Where each entry of a run-time shape vector comes from.

Exporters with dynamic axes compute Reshape/Expand targets at run time (`Shape -> Gather -> Concat`).
An entry that reads the size of a channel axis is fine when it lands exactly where that axis's
channels go (it shrinks with them) and wrong anywhere else (head_dim = hidden / heads). Tracking
each entry's provenance lets rules accept the first and block the second, instead of blocking both.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
from onnx import NodeProto

from graphprune.onnxutil import attr, ints

if TYPE_CHECKING:
    from graphprune.depgraph import DependencyGraph


@dataclass(frozen=True)
class DimRef:
    """The entry equals `factor` x the run-time size of `tensor`'s `axis`."""

    tensor: str
    axis: int
    factor: Fraction = Fraction(1)


@dataclass(frozen=True)
class ConstRef:
    """The entry is stored in constant `tensor` at flat `offset` (rewritable)."""

    tensor: str
    offset: int
    value: int


@dataclass(frozen=True)
class Known:
    """A value known at analysis time that is not stored anywhere rewritable (a comparison)."""

    value: int


Entry = DimRef | ConstRef | Known | None


def entries(g: DependencyGraph, name: str) -> list[Entry] | None:
    """Provenance of every entry of an integer shape vector, or None when unknown."""
    if g.is_const(name):
        values = np.asarray(g.const(name)).reshape(-1)
        if not np.issubdtype(values.dtype, np.integer):
            return None
        return [ConstRef(name, i, int(v)) for i, v in enumerate(values.tolist())]
    return g.shape_values.get(name)


def tracked_refs(g: DependencyGraph, values: list[Entry]) -> list[DimRef]:
    return [e for e in values if isinstance(e, DimRef) and e.axis in g.tracked(e.tensor)]


PROPAGATING = frozenset({"Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity",
                         "Reshape", "Mul", "Div", "Equal", "Where"})


def propagate(node: NodeProto, g: DependencyGraph) -> bool:
    """Record the provenance of `node`'s output if it is a shape computation we can follow."""
    op, out = node.op_type, node.output[0]
    if op == "Shape":
        rank = g.rank(node.input[0])
        axes = list(range(rank))[slice(attr(node, "start", 0), attr(node, "end"))]
        g.shape_values[out] = [DimRef(node.input[0], a) for a in axes]
        return True
    src = entries(g, node.input[0])
    result = None if src is None else _apply(node, g, src)
    if result is None:
        return False
    g.shape_values[out] = result
    return True


def _apply(node: NodeProto, g: DependencyGraph, src: list[Entry]) -> list[Entry] | None:
    op = node.op_type
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity") or (op == "Reshape" and g.rank(node.output[0]) <= 1):
        return src
    if op == "Gather" and int(attr(node, "axis", 0)) == 0 and g.is_const(node.input[1]):
        return [src[i] for i in ints(g.const(node.input[1]))]
    if op == "Slice" and all(g.is_const(i) for i in node.input[1:] if i):
        starts, ends = ints(g.const(node.input[1])), ints(g.const(node.input[2]))
        step = ints(g.const(node.input[4]))[0] if len(node.input) > 4 and node.input[4] else 1
        return src[slice(starts[0], ends[0], step)]
    if op == "Concat":
        parts = [entries(g, i) for i in node.input]
        return None if any(p is None for p in parts) else [e for p in parts for e in p or []]
    if op in ("Mul", "Div"):
        return _scale(node, g, src)
    if op == "Equal":
        return _equal(g, src, node.input[1])
    if op == "Where":
        return _where(g, src, node.input[1], node.input[2])
    return None


def _equal(g: DependencyGraph, src: list[Entry], other: str) -> list[Entry] | None:
    """`shape == -1` (torch's expand(-1) lowering): a run-time size is never negative."""
    if not g.is_const(other):
        return None
    values = np.broadcast_to(np.asarray(g.const(other)).reshape(-1), (len(src),)).tolist()
    out: list[Entry] = []
    for e, v in zip(src, values, strict=True):
        if isinstance(e, ConstRef | Known):
            out.append(Known(int(e.value == v)))
        else:
            out.append(Known(0) if isinstance(e, DimRef) and v < 0 else None)
    return out


def _where(g: DependencyGraph, cond: list[Entry], a: str, b: str) -> list[Entry] | None:
    picks, fallback = entries(g, a), entries(g, b)
    if picks is None or fallback is None or not all(isinstance(c, Known) for c in cond):
        return None
    n = len(cond)
    picks, fallback = (p * n if len(p) == 1 else p for p in (picks, fallback))
    return [x if isinstance(c, Known) and c.value else y for c, x, y in zip(cond, picks, fallback, strict=True)]


def _scale(node: NodeProto, g: DependencyGraph, src: list[Entry]) -> list[Entry] | None:
    """dim * k or dim / k with a constant scalar k (merged heads, head_dim = hidden / heads)."""
    other = node.input[1]
    if not g.is_const(other) or np.asarray(g.const(other)).size != 1:
        return None
    k = int(np.asarray(g.const(other)).reshape(-1)[0])
    if k == 0:
        return None
    factor = Fraction(k) if node.op_type == "Mul" else Fraction(1, k)
    return [DimRef(e.tensor, e.axis, e.factor * factor) if isinstance(e, DimRef) else None for e in src]
