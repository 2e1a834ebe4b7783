"""Ops that move, merge or split axes: Transpose, Reshape, Flatten, Squeeze/Unsqueeze, Expand,
Tile, Shape. A channel axis that is merged with others becomes blocks of positions (Flatten);
one split into (heads, head_dim) makes each head one unit, so attention loses whole heads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from onnx import NodeProto

from graphprune.elements import Labels
from graphprune.onnxutil import attr, ints
from graphprune.reasons import BlockKind, Unmappable
from graphprune.rules.common import axes_of, passthrough, remap, union_blocks
from graphprune.rules.registry import Rule, register

if TYPE_CHECKING:
    from graphprune.depgraph import DependencyGraph
    from graphprune.surgery import SurgeryContext


@dataclass(frozen=True)
class AxisMap:
    """Where input channel axis `axis` lands in a reshape's output.

    kind "keep": same channels on `out_axis`; "split": `out_axis` holds units of `block` channels
    (heads); "merge": `out_axis` holds the input axes `first..last` flattened (Flatten blocks).
    """

    kind: str
    out_axis: int
    block: int = 1
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
            return AxisMap("split", span[0], block=in_shape[axis] // out_shape[span[0]])
    for b, size in enumerate(out_shape):
        if size > 1 and pout[b] <= before and pout[b + 1] >= after:
            firsts = [i for i in range(axis + 1) if pin[i] == pout[b]]
            lasts = [i for i in range(axis, len(in_shape)) if pin[i + 1] == pout[b + 1]]
            if firsts and lasts:
                return AxisMap("merge", b, first=firsts[-1], last=lasts[0])
            return None
    return None


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
        elif m.kind == "split":
            g.set_dim(y, m.out_axis, union_blocks(g, labels, m.block))
        else:
            g.set_dim(y, m.out_axis, merged_labels(in_shape, axis, m.first, m.last, labels))


def shape_entry_source(g: DependencyGraph, name: str, index: int) -> tuple[str, int] | None:
    """The constant (tensor, offset) that holds entry `index` of a shape vector, if any."""
    if g.is_const(name):
        return name, index
    node = g.producer.get(name)
    if node is None:
        return None
    if node.op_type in ("Cast", "Identity"):
        return shape_entry_source(g, node.input[0], index)
    if node.op_type == "Concat":
        offset = 0
        for piece in node.input:
            n = g.shape(piece)[0] if g.rank(piece) else 1
            if index < offset + n:
                return shape_entry_source(g, piece, index - offset)
            offset += n
    return None


def _entries(tracked: dict[int, Labels], axes: list[int] | None) -> list[tuple[int, int]]:
    """(output axis, entry index) of each tracked axis the shape vector holds an entry for.

    `axes` are the output axes the vector describes, in order: all of them by default, only the
    trailing ones for Expand (right-aligned), the listed ones for Resize's `axes` attribute.
    """
    if axes is None:
        return [(a, a) for a in tracked]
    return [(a, axes.index(a)) for a in tracked if a in axes]


def check_shape_entries(node: NodeProto, g: DependencyGraph, shape_input: str, y: str,
                        axes: list[int] | None = None) -> None:
    """Every entry of a shape vector that fixes a tracked output axis must be rewritable."""
    for _, entry in _entries(g.tracked(y), axes):
        source = shape_entry_source(g, shape_input, entry)
        if source is None:
            raise Unmappable(BlockKind.SHAPE_NOT_REWRITABLE,
                             f"entry {entry} of shape '{shape_input}' is computed at run time")


def rewrite_shape_entries(sx: SurgeryContext, shape_input: str, y: str, keep: frozenset[int],
                          axes: list[int] | None = None) -> None:
    """Write the new sizes of `y`'s tracked axes into the constants behind `shape_input`.

    Entries whose value is in `keep` (-1 = infer, 0 = copy, 1 = broadcast) adapt by themselves.
    """
    new = sx.new_shape(y)
    for axis, entry in _entries(sx.graph.tracked(y), axes):
        source = shape_entry_source(sx.graph, shape_input, entry)
        assert source is not None, "checked at analysis"
        name, offset = source
        values = sx.const(name).copy()
        flat = values.reshape(-1)
        if int(flat[offset]) not in keep:
            flat[offset] = new[axis]
            sx.set_const(name, values)


@register("Reshape")
class ReshapeRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x, y = node.input[0], node.output[0]
        map_reshape(node, g, x, y)
        check_shape_entries(node, g, node.input[1], y)
        for axis in g.tracked(y):
            source = shape_entry_source(g, node.input[1], axis)
            if source is not None and int(g.const(source[0]).reshape(-1)[source[1]]) == 0 \
                    and not np.array_equal(g.tracked(x).get(axis, np.empty(0)), g.tracked(y)[axis]):
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
    """Run-time shape reads are safe only when no reader looks at a channel axis's size."""

    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x = node.input[0]
        rank = g.rank(x)
        start, end = _clamp_axis(int(attr(node, "start", 0)), rank), _clamp_axis(int(attr(node, "end", rank)), rank)
        tracked = [a - start for a in g.tracked(x) if start <= a < end]
        if not tracked:
            return
        for user in g.users.get(node.output[0], []):
            read = _entries_read(user, g)
            if read is None or set(read) & set(tracked):
                raise Unmappable(BlockKind.SHAPE_NOT_REWRITABLE,
                                 f"'{user.name or user.op_type}' reads the run-time size of a channel axis")


def _clamp_axis(index: int, rank: int) -> int:
    """Shape's start/end: negative counts from the back, then clamped to [0, rank] (not modulo)."""
    return min(max(index + rank if index < 0 else index, 0), rank)


def _entries_read(user: NodeProto, g: DependencyGraph) -> list[int] | None:
    """Entries of a shape vector that `user` reads (negative indices normalised), None if unknown."""
    if user.op_type == "Gather" and g.is_const(user.input[1]) and int(attr(user, "axis", 0)) == 0:
        length = g.shape(user.input[0])[0]
        return [i % length for i in ints(g.const(user.input[1]))]
    if user.op_type == "Slice" and len(user.input) > 2 and all(g.is_const(i) for i in user.input[1:] if i):
        starts, ends = ints(g.const(user.input[1])), ints(g.const(user.input[2]))
        steps = ints(g.const(user.input[4])) if len(user.input) > 4 and user.input[4] else [1]
        return list(range(g.shape(user.input[0])[0]))[slice(starts[0], ends[0], steps[0])]
    return None
