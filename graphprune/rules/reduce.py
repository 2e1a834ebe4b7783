"""Reductions, softmax-like and scan ops: fine along other axes, blocking along a channel axis
(the result over the kept channels would differ from the original)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx import NodeProto

from graphprune.onnxutil import attr
from graphprune.reasons import BlockKind, Unmappable
from graphprune.rules.common import axes_of, passthrough, remap
from graphprune.rules.registry import Rule, register

if TYPE_CHECKING:
    from graphprune.depgraph import DependencyGraph

REDUCE = (
    "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
)


def _check_not_channel(node: NodeProto, g: DependencyGraph, axes: list[int]) -> None:
    x = node.input[0]
    rank = g.rank(x)
    hit = sorted({a % rank for a in axes} & set(g.tracked(x)))
    if hit:
        raise Unmappable(BlockKind.REDUCES_CHANNELS, f"{node.op_type} over channel axis {hit[0]} of '{x}'")


def _reduce_map(g: DependencyGraph, x: str, axes: list[int], keepdims: bool) -> dict[int, int]:
    rank = g.rank(x)
    reduced = {a % rank for a in axes}
    kept = [a for a in range(rank) if a not in reduced]
    return {a: a for a in kept} if keepdims else {a: i for i, a in enumerate(kept)}


@register(*REDUCE)
class Reduce(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x = node.input[0]
        axes = axes_of(node, g, 1)
        if not axes:
            if int(attr(node, "noop_with_empty_axes", 0)):
                passthrough(g, x, node.output[0])
                return
            axes = list(range(g.rank(x)))
        mapping = _reduce_map(g, x, axes, bool(attr(node, "keepdims", 1)))
        if g.approximate_norms and node.op_type == "ReduceMean" and int(attr(node, "keepdims", 1)):
            _approximate_channels(node, g, mapping)  # a norm's statistics (RMSNorm, decomposed LayerNorm)
            return
        _check_not_channel(node, g, axes)
        remap(g, x, node.output[0], mapping, "reduced")


def _approximate_channels(node: NodeProto, g: DependencyGraph, mapping: dict[int, int]) -> None:
    """Channels averaged over may go; the axes kept carry their labels on as usual."""
    for axis, labels in g.tracked(node.input[0]).items():
        if axis in mapping:
            g.set_dim(node.output[0], mapping[axis], labels)
        else:
            g.approximate(labels, node, "averages over the channel axis: once channels go, the mean comes from "
                                        "the kept ones (approximate_norms; measured in validation)")


@register("ArgMax", "ArgMin")
class ArgReduce(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        axes = [int(attr(node, "axis", 0))]
        _check_not_channel(node, g, axes)
        x = node.input[0]
        remap(g, x, node.output[0], _reduce_map(g, x, axes, bool(attr(node, "keepdims", 1))), "reduced")


@register("Softmax", "LogSoftmax", "Hardmax")
class SoftmaxRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x = node.input[0]
        rank = g.rank(x)
        if g.opset >= 13:
            axes = [int(attr(node, "axis", -1))]
        else:  # older opsets flatten every axis from `axis` on into the softmax
            axes = list(range(int(attr(node, "axis", 1)) % rank, rank))
        _check_not_channel(node, g, axes)
        passthrough(g, x, node.output[0])


@register("TopK")
class TopKRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        _check_not_channel(node, g, [int(attr(node, "axis", -1))])
        for out in node.output:
            if out:
                passthrough(g, node.input[0], out)


@register("CumSum")
class CumSumRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        axes = axes_of(node, g, 1, attr_name="__axis_input__") or []
        _check_not_channel(node, g, axes)
        passthrough(g, node.input[0], node.output[0])
