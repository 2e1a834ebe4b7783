"""Concat, Split and Slice along (or across) channel axes.

Concat keeps each input's labels at its offset, so one Concat never fuses its producers' groups;
Split/Slice hand each output its own run of positions and their sizes are rewritten from what is
kept, never assumed even (YOLO C2f chunks, uneven torch.split).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import NodeProto, TensorProto

from graphprune.elements import Labels
from graphprune.onnxutil import attr, ints, set_attr
from graphprune.reasons import BlockKind, Unmappable
from graphprune.rules.common import axes_of, couple_broadcast
from graphprune.rules.registry import Rule, register

if TYPE_CHECKING:
    from graphprune.depgraph import DependencyGraph
    from graphprune.surgery import SurgeryContext


def _split_off(g: DependencyGraph, x: str, axis: int) -> tuple[dict[int, Labels], Labels | None]:
    other = {a: lab for a, lab in g.tracked(x).items() if a != axis}
    return other, g.tracked(x).get(axis)


@register("Concat")
class ConcatRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        y = node.output[0]
        rank = g.rank(y)
        axis = int(attr(node, "axis")) % rank
        parts = [g.tracked(x).get(axis) for x in node.input]
        if any(p is not None for p in parts):
            labels = []
            for x, part in zip(node.input, parts, strict=True):
                if part is None:
                    part = g.new_space(node, x, g.shape(x)[axis])
                    g.block(part, BlockKind.FIXED_OPERAND, node, f"channels of '{x}' are fixed")
                labels.append(part)
            g.set_dim(y, axis, np.concatenate(labels))
        couple_broadcast(node, g, list(node.input), y, skip=frozenset({axis}))


def _split_sizes(node: NodeProto, g: DependencyGraph, size: int) -> list[int]:
    if len(node.input) > 1 and node.input[1]:
        if not g.is_const(node.input[1]):
            raise Unmappable(BlockKind.SHAPE_NOT_REWRITABLE, "Split sizes are computed at run time")
        return ints(g.const(node.input[1]))
    if attr(node, "split") is not None:
        return [int(v) for v in attr(node, "split")]
    n = len(node.output)
    chunk = -(-size // n)
    return [min(chunk, size - i * chunk) for i in range(n)]


@register("Split")
class SplitRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x = node.input[0]
        axis = int(attr(node, "axis", 0)) % g.rank(x)
        other, labels = _split_off(g, x, axis)
        sizes = _split_sizes(node, g, g.shape(x)[axis])
        offset = 0
        for out, n in zip(node.output, sizes, strict=True):
            if labels is not None:
                g.set_dim(out, axis, labels[offset : offset + n])
            for a, lab in other.items():
                g.set_dim(out, a, lab)
            offset += n

    def rewrite(self, node: NodeProto, sx: SurgeryContext) -> None:
        x = node.input[0]
        axis = int(attr(node, "axis", 0)) % len(sx.old_shape(x))
        if axis not in sx.graph.tracked(x):
            return
        sizes = np.array([sx.new_shape(o)[axis] for o in node.output], dtype=np.int64)
        if len(node.input) > 1 and node.input[1]:
            sx.set_const(node.input[1], sizes)
        elif sx.graph.opset < 13:
            set_attr(node, "split", [int(s) for s in sizes])
        else:
            name = sx.add_const(f"{node.name or node.output[0]}_split", sizes, TensorProto.INT64)
            if len(node.input) < 2:
                node.input.append(name)
            else:
                node.input[1] = name
            for i, a in enumerate(node.attribute):
                if a.name == "num_outputs":
                    del node.attribute[i]
                    break


def _slice_params(node: NodeProto, g: DependencyGraph) -> tuple[list[int], list[int], list[int], list[int]]:
    """starts, ends, axes, steps from attributes (opset < 10) or constant inputs."""
    if g.opset < 10:
        starts, ends = list(attr(node, "starts")), list(attr(node, "ends"))
        axes = list(attr(node, "axes", range(len(starts))))
        return starts, ends, axes, [1] * len(starts)
    for i in node.input[1:]:
        if i and not g.is_const(i):
            raise Unmappable(BlockKind.SHAPE_NOT_REWRITABLE, f"Slice bound '{i}' is computed at run time")
    starts, ends = ints(g.const(node.input[1])), ints(g.const(node.input[2]))
    axes = axes_of(node, g, 3) or list(range(len(starts)))
    steps = ints(g.const(node.input[4])) if len(node.input) > 4 and node.input[4] else [1] * len(starts)
    return starts, ends, axes, steps


def _clamp(start: int, end: int, size: int) -> tuple[int, int]:
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    return min(max(start, 0), size), min(max(end, 0), size)


@register("Slice")
class SliceRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x, y = node.input[0], node.output[0]
        rank = g.rank(x)
        starts, ends, axes, steps = _slice_params(node, g)
        sliced = {a % rank: (s, e, st) for s, e, a, st in zip(starts, ends, axes, steps, strict=True)}
        for axis, labels in g.tracked(x).items():
            if axis in sliced:
                s, e, step = sliced[axis]
                if step != 1:
                    raise Unmappable(BlockKind.LAYOUT, f"strided Slice (step {step}) along a channel axis")
                s, e = _clamp(s, e, labels.size)
                g.set_dim(y, axis, labels[s:e])
            else:
                g.set_dim(y, axis, labels)

    def rewrite(self, node: NodeProto, sx: SurgeryContext) -> None:
        x = node.input[0]
        rank = len(sx.old_shape(x))
        starts, ends, axes, _ = _slice_params(node, sx.graph)
        changed = False
        for i, axis in enumerate(axes):
            keep = sx.keep(x, axis % rank)
            if keep is None:
                continue
            s, e = _clamp(starts[i], ends[i], keep.size)
            starts[i], ends[i] = int(keep[:s].sum()), int(keep[:e].sum())
            changed = True
        if not changed:
            return
        if sx.graph.opset < 10:
            set_attr(node, "starts", starts)
            set_attr(node, "ends", ends)
        else:
            sx.set_const(node.input[1], np.array(starts, dtype=sx.const(node.input[1]).dtype))
            sx.set_const(node.input[2], np.array(ends, dtype=sx.const(node.input[2]).dtype))
