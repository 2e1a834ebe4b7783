"""Ops that move, merge or split axes: Transpose, Reshape, Flatten, Squeeze/Unsqueeze, Expand,
Tile, Shape. A channel axis that is merged with others becomes blocks of positions (Flatten);
one split into (heads, head_dim) makes each head one unit, so attention loses whole heads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
from onnx import NodeProto

from graphprune import shapeflow
from graphprune.elements import Labels
from graphprune.onnxutil import attr, ints
from graphprune.reasons import BlockKind, Unmappable
from graphprune.rules.common import axes_of, block_axis, passthrough, remap
from graphprune.rules.registry import Rule, register
from graphprune.shapeflow import ConstRef, DimRef

if TYPE_CHECKING:
    from graphprune.depgraph import DependencyGraph
    from graphprune.surgery import SurgeryContext


@dataclass(frozen=True)
class AxisMap:
    """Where input channel axis `axis` lands in a reshape's output.

    kind "keep": same channels on `out_axis`; "split": the channels spread over the output axes
    `span`, of which `out_axis` is tracked and the others are fused into its units (heads);
    "merge": `out_axis` holds the input axes `first..last` flattened (Flatten blocks).
    """

    kind: str
    out_axis: int
    span: tuple[int, ...] = ()
    first: int = 0
    last: int = 0


def _prefix(shape: tuple[int, ...]) -> list[int]:
    return [math.prod(shape[:i]) for i in range(len(shape) + 1)]


def reshape_axis_map(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int) -> AxisMap | None:
    """Exact image of one input axis under a row-major reshape, or None if it is scrambled."""
    pin, pout = _prefix(in_shape), _prefix(out_shape)
    before, after = pin[axis], pin[axis + 1]
    starts = [b for b in range(len(out_shape)) if pout[b] == before]
    ends = [b for b in range(len(out_shape)) if pout[b + 1] == after]
    if starts and ends and starts[0] <= ends[-1]:
        span = [b for b in range(starts[0], ends[-1] + 1) if out_shape[b] > 1]
        if len(span) == 1:
            return AxisMap("keep", span[0])
        if span and in_shape[axis] == math.prod(out_shape[b] for b in span):
            # (heads, head_dim): heads are the unit; (n_proj, heads, head_dim) of a fused QKV
            # projection: heads still, fused across q/k/v, so a later Gather of q, k or v keeps them
            tracked = span[0] if len(span) == 2 else span[-2]
            return AxisMap("split", tracked, span=tuple(span))
    for b, size in enumerate(out_shape):
        if size > 1 and pout[b] <= before and pout[b + 1] >= after:
            firsts = [i for i in range(axis + 1) if pin[i] == pout[b]]
            lasts = [i for i in range(axis, len(in_shape)) if pin[i + 1] == pout[b + 1]]
            if firsts and lasts:
                return AxisMap("merge", b, first=firsts[-1], last=lasts[0])
            return None
    return None


def _fuse_split(g: DependencyGraph, labels: Labels, sizes: list[int], tracked: int) -> Labels:
    """Fuse all positions sharing an index on the tracked split axis; one label per index."""
    rows = np.moveaxis(labels.reshape(sizes), tracked, 0).reshape(sizes[tracked], -1)
    g.union(rows.reshape(-1), np.repeat(rows[:, 0], rows.shape[1]))
    return rows[:, 0].copy()


_SAME_AXES = frozenset({"Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Identity"})


def _reduced_downstream(g: DependencyGraph, y: str, axis: int, depth: int = 4) -> bool:
    """Whether `y`'s `axis` is softmaxed or reduced over a few axis-preserving steps later.

    A channel axis split into (radix, C) whose radix axis is then summed or softmaxed over
    (ResNeSt, SKNet) must keep the inner C as the unit, coupled across the slots; heads
    (attention) are never reduced over and stay the unit.
    """
    rank = g.rank(y)
    for node in g.users.get(y, []):
        op, later = node.op_type, None
        if op in ("Softmax", "LogSoftmax"):
            if int(attr(node, "axis", -1 if g.opset >= 13 else 1)) % rank == axis:
                return True
        elif op.startswith("Reduce"):
            try:
                axes = axes_of(node, g, 1)
            except Unmappable:
                continue
            if axes is None or axis in {a % rank for a in axes}:
                return True
        elif op == "Transpose":
            later = ints(attr(node, "perm", list(reversed(range(rank))))).index(axis)
        elif op in _SAME_AXES and g.rank(node.output[0]) == rank:
            later = axis
        if later is not None and depth > 0 and _reduced_downstream(g, node.output[0], later, depth - 1):
            return True
    return False


def merged_labels(in_shape: tuple[int, ...], axis: int, first: int, last: int, labels: Labels) -> Labels:
    """Labels of a flattened run of axes `first..last` in which only `axis` carries channels."""
    run = in_shape[first : last + 1]
    view = [1] * len(run)
    view[axis - first] = labels.size
    return np.broadcast_to(labels.reshape(view), run).reshape(-1).copy()


def map_reshape(node: NodeProto, g: DependencyGraph, x: str, y: str) -> None:
    in_shape, out_shape = g.shape(x), g.shape(y)
    for axis, labels in g.tracked(x).items():
        m = reshape_axis_map(in_shape, out_shape, axis)
        if m is None:
            raise Unmappable(BlockKind.LAYOUT, f"reshape {list(in_shape)} -> {list(out_shape)} scrambles axis {axis}")
        if m.kind == "keep":
            g.set_dim(y, m.out_axis, labels)
        elif m.kind == "split" and (block := block_axis(labels, [out_shape[b] for b in m.span])) is not None:
            # undoing a merge (GroupNorm's Reshape back from [N, G, C*H*W]): the blocks are channels again
            sizes = [out_shape[b] for b in m.span]
            g.set_dim(y, m.span[block], np.moveaxis(labels.reshape(sizes), block, -1).reshape(-1, sizes[block])[0])
        elif m.kind == "split":
            out_axis = m.out_axis
            if len(m.span) == 2 and _reduced_downstream(g, y, m.span[0]):
                out_axis = m.span[1]  # split attention: the radix slots are summed, the inner channels are units
            g.set_dim(y, out_axis, _fuse_split(g, labels, [out_shape[b] for b in m.span], m.span.index(out_axis)))
        else:
            g.set_dim(y, m.out_axis, merged_labels(in_shape, axis, m.first, m.last, labels))


def _follows(g: DependencyGraph, y_labels: Labels, x_labels: Labels, factor: Fraction) -> bool:
    """y's positions are x's units, each exactly `factor` times as often: sizes stay in step.

    Compared on current union-find roots; later unions merge counts on both sides alike.
    """
    if factor.denominator != 1:
        return False
    ux, cx = np.unique([g.pool.find(int(e)) for e in x_labels], return_counts=True)
    uy, cy = np.unique([g.pool.find(int(e)) for e in y_labels], return_counts=True)
    return bool(np.array_equal(ux, uy) and np.array_equal(cy, cx * factor.numerator))


def _described_axes(g: DependencyGraph, y: str, axes: list[int] | None) -> list[int]:
    """Output axes a shape vector describes, in order: all by default, fewer for Expand/Resize."""
    return list(range(g.rank(y))) if axes is None else axes


def check_shape_entries(node: NodeProto, g: DependencyGraph, shape_input: str, y: str,
                        axes: list[int] | None = None) -> None:
    """Every entry of a shape vector must stay right when channels go.

    A constant entry of a shrinking axis is rewritten at surgery; a run-time read of a channel
    count is right only where exactly those channels land (it shrinks with them); anything else
    that depends on a channel count, or fixes a shrinking axis at run time, blocks.
    """
    values = shapeflow.entries(g, shape_input)
    y_tracked = g.tracked(y)
    for i, axis in enumerate(_described_axes(g, y, axes)):
        entry = values[i] if values is not None and i < len(values) else None
        labels = y_tracked.get(axis)
        if isinstance(entry, DimRef) and (ref := g.tracked(entry.tensor).get(entry.axis)) is not None:
            if labels is not None and _follows(g, labels, ref, entry.factor):
                continue
            g.block(ref, BlockKind.SHAPE_NOT_REWRITABLE, node,
                    f"entry {i} of '{shape_input}' is computed from the channel count of '{entry.tensor}'")
            if labels is not None:
                raise Unmappable(BlockKind.SHAPE_NOT_REWRITABLE, f"entry {i} of '{shape_input}' would not follow")
        elif labels is not None and not isinstance(entry, ConstRef):
            raise Unmappable(BlockKind.SHAPE_NOT_REWRITABLE,
                             f"entry {i} of shape '{shape_input}' is fixed at run time")


def rewrite_shape_entries(sx: SurgeryContext, shape_input: str, y: str, keep: frozenset[int],
                          axes: list[int] | None = None) -> None:
    """Write the new sizes of `y`'s tracked axes into the constants behind `shape_input`.

    Entries whose value is in `keep` (-1 = infer, 0 = copy, 1 = broadcast) adapt by themselves, and
    so do run-time reads of the same channels.
    """
    new = sx.new_shape(y)
    values = shapeflow.entries(sx.graph, shape_input) or []
    for i, axis in enumerate(_described_axes(sx.graph, y, axes)):
        entry = values[i] if i < len(values) else None
        if axis in sx.graph.tracked(y) and isinstance(entry, ConstRef) and entry.value not in keep:
            const = sx.const(entry.tensor).copy()
            const.reshape(-1)[entry.offset] = new[axis]
            sx.set_const(entry.tensor, const)


@register("Reshape")
class ReshapeRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x, y = node.input[0], node.output[0]
        map_reshape(node, g, x, y)
        check_shape_entries(node, g, node.input[1], y)
        values = shapeflow.entries(g, node.input[1]) or []
        for axis, labels in g.tracked(y).items():
            entry = values[axis] if axis < len(values) else None
            if isinstance(entry, ConstRef) and entry.value == 0 \
                    and not np.array_equal(g.tracked(x).get(axis, np.empty(0)), labels):
                raise Unmappable(BlockKind.SHAPE_NOT_REWRITABLE, f"entry {axis} copies a different input axis")

    def rewrite(self, node: NodeProto, sx: SurgeryContext) -> None:
        rewrite_shape_entries(sx, node.input[1], node.output[0], frozenset({-1, 0}))


@register("Flatten")
class FlattenRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        map_reshape(node, g, node.input[0], node.output[0])


@register("Transpose")
class TransposeRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x = node.input[0]
        rank = g.rank(x)
        perm = [int(p) for p in attr(node, "perm", list(range(rank))[::-1])]
        remap(g, x, node.output[0], {src: dst for dst, src in enumerate(perm)}, "transpose")


@register("Squeeze")
class SqueezeRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x = node.input[0]
        shape = g.shape(x)
        axes = axes_of(node, g, 1)
        squeezed = {a % len(shape) for a in axes} if axes else {a for a, s in enumerate(shape) if s == 1}
        kept = [a for a in range(len(shape)) if a not in squeezed]
        remap(g, x, node.output[0], {a: i for i, a in enumerate(kept)}, "squeezed channel axis")


@register("Unsqueeze")
class UnsqueezeRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x, y = node.input[0], node.output[0]
        out_rank = g.rank(y)
        inserted = {a % out_rank for a in axes_of(node, g, 1) or []}
        kept = [a for a in range(out_rank) if a not in inserted]
        remap(g, x, y, dict(enumerate(kept)), "unsqueeze")


@register("Expand")
class ExpandRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x, y = node.input[0], node.output[0]
        shift = g.rank(y) - g.rank(x)
        for axis, labels in g.tracked(x).items():
            if g.shape(x)[axis] != g.shape(y)[axis + shift]:
                raise Unmappable(BlockKind.LAYOUT, "Expand broadcasts a channel axis")
            g.set_dim(y, axis + shift, labels)
        check_shape_entries(node, g, node.input[1], y, self._described(g, node))

    def rewrite(self, node: NodeProto, sx: SurgeryContext) -> None:
        rewrite_shape_entries(sx, node.input[1], node.output[0], frozenset({1}), self._described(sx.graph, node))

    @staticmethod
    def _described(g: DependencyGraph, node: NodeProto) -> list[int]:
        """The shape broadcasts right-aligned: a vector shorter than Y describes its trailing axes."""
        rank, length = g.rank(node.output[0]), g.shape(node.input[1])[0]
        return list(range(rank - length, rank))


@register("Tile")
class TileRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x = node.input[0]
        if not g.is_const(node.input[1]):
            raise Unmappable(BlockKind.SHAPE_NOT_REWRITABLE, "Tile repeats are computed at run time")
        repeats = ints(g.const(node.input[1]))
        if any(repeats[a] != 1 for a in g.tracked(x)):
            raise Unmappable(BlockKind.LAYOUT, "Tile repeats a channel axis")
        passthrough(g, x, node.output[0])


@register("Shape")
class ShapeRule(Rule):
    """Shape has no channels of its own; what its readers do with a channel count is followed by
    `graphprune.shapeflow` and judged where the value lands (see `check_shape_entries`)."""

    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        return None
