"""Gemm, MatMul (constant operand of any rank, or two activations) and embedding Gather.

A constant operand's output features are a fresh space (a producer); its contracted axis is
labelled with the activation's channels (a consumer). Two activations contracted together
(Q·Kᵀ, attn·V) must lose the same positions on the contracted axis, so they are coupled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from onnx import NodeProto

from graphprune.elements import Labels
from graphprune.onnxutil import attr
from graphprune.reasons import BlockKind, Unmappable
from graphprune.rules.common import block_axis, couple_broadcast, remap
from graphprune.rules.registry import Rule, register

if TYPE_CHECKING:
    from graphprune.depgraph import DependencyGraph
    from graphprune.surgery import SurgeryContext


def _selected_channels(g: DependencyGraph, data: str, indices: str, axis: int) -> tuple[int, Labels] | None:
    """(axis of the indices, labels) when constant `indices` into tracked channels of `data` pick
    channels that vary along one axis of the indices only, so the gathered tensor has them there."""
    labels = g.tracked(data).get(axis)
    if labels is None or not g.is_const(indices) or g.rank(indices) == 0:
        return None
    index = g.const(indices).astype(np.int64) % labels.size
    picked = labels[index]
    along = block_axis(picked.reshape(-1), list(index.shape))
    if along is None:
        return None
    return along, np.moveaxis(picked, along, 0).reshape(index.shape[along], -1)[:, 0].copy()


def contract(node: NodeProto, g: DependencyGraph, a_axes: tuple[int | None, int],
             b_axes: tuple[int, int | None], out_axes: tuple[int | None, int | None]) -> None:
    """Couple A[.., M, K] · B[.., K, N] -> Y[.., M, N] given the axis indices of M, K, N."""
    a, b, y = node.input[0], node.input[1], node.output[0]
    (a_m, a_k), (b_k, b_n), (y_m, y_n) = a_axes, b_axes, out_axes
    ca, cb = g.is_const(a), g.is_const(b)
    la, lb = g.tracked(a).get(a_k % g.rank(a)), g.tracked(b).get(b_k % g.rank(b))
    if cb and not ca and la is not None:
        g.set_dim(b, b_k, la, "in")
        g.consume(node, 0, a_k)
    elif ca and not cb and lb is not None:
        g.set_dim(a, a_k, lb, "in")
        g.consume(node, 1, b_k)
    elif not ca and not cb and (la is not None or lb is not None):
        if la is not None and lb is not None:
            g.union(la, lb)
            g.consume(node, 0, a_k)
            g.consume(node, 1, b_k)
        else:
            for tracked in (la, lb):
                if tracked is not None:
                    g.block(tracked, BlockKind.FIXED_OPERAND, node, "contracted with fixed channels")
    for const, operand, axis, out_axis in ((cb, b, b_n, y_n), (ca, a, a_m, y_m)):
        if axis is None or out_axis is None:
            continue
        if const:
            labels = g.new_space(node, y, g.shape(operand)[axis])
            g.set_dim(operand, axis, labels, "out")
            g.set_dim(y, out_axis, labels)
        elif (tracked := g.tracked(operand).get(axis % g.rank(operand))) is not None:
            g.set_dim(y, out_axis, tracked)


@register("MatMul")
class MatMulRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        ra, rb = g.rank(node.input[0]), g.rank(node.input[1])
        if ra < 2 or rb < 2:
            if any(g.tracked(i) or g.is_const(i) for i in node.input):
                raise Unmappable(BlockKind.LAYOUT, "MatMul with a 1-D operand")
            return
        couple_broadcast(node, g, list(node.input), node.output[0], trailing=2)
        contract(node, g, (ra - 2, ra - 1), (rb - 2, rb - 1), (-2, -1))

    def macs(self, node: NodeProto, shape: Callable[[str], tuple[int, ...]]) -> int:
        return math.prod(shape(node.output[0])) * shape(node.input[0])[-1]


@register("Gemm")
class GemmRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        ta, tb = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
        contract(node, g, (ta, 1 - ta), (tb, 1 - tb), (0, 1))
        if len(node.input) > 2 and node.input[2]:
            self._bias(node, g)

    @staticmethod
    def _bias(node: NodeProto, g: DependencyGraph) -> None:
        """C is added to A·B like an Add: a constant one is sliced with Y; an activation (addmm of a
        residual) couples its own channels with Y's, and blocks where Y's are fixed."""
        c, y = node.input[2], node.output[0]
        y_labels = g.tracked(y)
        for j in range(g.rank(c)):
            axis = j + 2 - g.rank(c)
            if g.shape(c)[j] == 1:
                continue
            own, out = g.tracked(c).get(j), y_labels.get(axis)
            if own is not None and out is not None:
                g.union(out, own)
            elif own is not None:
                g.block(own, BlockKind.FIXED_OPERAND, node, f"Gemm bias '{c}' is added to fixed channels")
            elif out is not None and not g.is_const(c):
                g.block(out, BlockKind.FIXED_OPERAND, node, f"Gemm bias '{c}' is not constant")
            elif out is not None:
                g.set_dim(c, j, out, "bias")

    def macs(self, node: NodeProto, shape: Callable[[str], tuple[int, ...]]) -> int:
        a = shape(node.input[0])
        return math.prod(shape(node.output[0])) * a[0 if int(attr(node, "transA", 0)) else 1]


@register("Gather")
class GatherRule(Rule):
    """Embedding lookups make a fresh space of the table's features; other gathers move axes."""

    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        data, indices, y = node.input[0], node.input[1], node.output[0]
        axis = int(attr(node, "axis", 0)) % g.rank(data)
        for i, labels in g.tracked(indices).items():  # ids computed from channels (ArgMax...) keep them
            g.set_dim(y, axis + i, labels)
        if g.is_const(data) and not g.is_const(indices) and axis == 0 and g.rank(data) == 2:
            labels = g.new_space(node, y, g.shape(data)[1])
            g.set_dim(data, 1, labels, "out")
            g.set_dim(y, -1, labels)
            return
        r_idx = g.rank(indices)
        mapping = {a: a if a < axis else a + r_idx - 1 for a in range(g.rank(data)) if a != axis}
        selected = _selected_channels(g, data, indices, axis)
        if selected is None:
            remap(g, data, y, mapping, "Gather selects along a channel axis")
            return
        out_axis, labels = selected  # constant indices that keep the channels on one axis (dynamo's as_strided)
        g.set_dim(indices, out_axis, labels, "const")
        g.set_dim(y, axis + out_axis, labels)
        for a, other in g.tracked(data).items():
            if a != axis:
                g.set_dim(y, mapping[a], other)

    def rewrite(self, node: NodeProto, sx: SurgeryContext) -> None:
        """Constant indices into a channel axis that lost positions point at the kept ones' new places
        (surgery already dropped the indices of removed channels)."""
        data, indices = node.input[0], node.input[1]
        axis = int(attr(node, "axis", 0)) % sx.graph.rank(data)
        keep = sx.keep(data, axis)
        if keep is None or keep.all() or not sx.graph.is_const(indices):
            return
        old = sx.const(indices)
        position = np.cumsum(keep) - 1
        wrapped = old % keep.size
        assert keep[wrapped].all(), "an index of a removed channel survived"
        sx.set_const(indices, position[wrapped].astype(old.dtype))
