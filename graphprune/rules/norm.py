"""Normalizations. Per-channel ones (BatchNorm, InstanceNorm) keep channels independent; ones that
normalize ACROSS channels (LayerNorm over the channel axis, LRN) make every channel's output depend
on all others, so removing any would change the rest: they block. GroupNorm loses whole groups."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx import NodeProto

from graphprune.onnxutil import attr, set_attr
from graphprune.reasons import BlockKind, Unmappable
from graphprune.rules.common import passthrough, union_blocks
from graphprune.rules.registry import Rule, register

if TYPE_CHECKING:
    from graphprune.depgraph import DependencyGraph
    from graphprune.surgery import SurgeryContext

APPROXIMATE = ("normalizes over the channel axis: once channels go, its statistics come from the kept ones "
               "(approximate_norms; the error is measured in validation)")


PARAM_ROLES = {"BatchNormalization": ("affine", "bias", "stat", "stat"), "InstanceNormalization": ("affine", "bias")}


@register("BatchNormalization", "InstanceNormalization")
class PerChannelNorm(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x, y = node.input[0], node.output[0]
        spatial = list(range(2, g.rank(x)))
        if node.op_type == "InstanceNormalization" and g.approximate_norms:
            # GroupNorm exported as Reshape [N, G, C*H*W] -> InstanceNormalization -> Reshape back
            for axis in spatial:
                if (labels := g.tracked(x).get(axis)) is not None:
                    g.approximate(labels, node, APPROXIMATE)
            passthrough(g, x, y)
        elif node.op_type == "InstanceNormalization":
            # its statistics run over the spatial axes: channels tracked there (a Linear's features
            # used as width, GroupNorm's channels merged into one axis) would change every mean;
            # only axis 0 and 1 pass
            _block_normalized(node, g, spatial)
        elif int(attr(node, "training_mode", 0)) or any(node.output[1:]):
            _block_normalized(node, g, [0, *spatial])  # training: batch statistics over N and space
        else:
            passthrough(g, x, y)
        labels = g.tracked(x).get(1)
        if labels is None:
            return
        for out in node.output[1:]:  # training outputs (running/saved mean and var): one per channel
            if out:
                g.set_dim(out, 0, labels)
        for name, role in zip(node.input[1:], PARAM_ROLES[node.op_type], strict=False):
            if name:
                if not g.is_const(name):
                    raise Unmappable(BlockKind.FIXED_OPERAND, f"{node.op_type} parameter '{name}' is not constant")
                g.set_dim(name, 0, labels, role)


def _block_normalized(node: NodeProto, g: DependencyGraph, axes: list[int]) -> None:
    x = node.input[0]
    rank = g.rank(x)
    normalized = {a % rank for a in axes}
    for axis, labels in g.tracked(x).items():
        if axis in normalized:
            g.block(labels, BlockKind.NORMALIZES_CHANNELS, node,
                    "normalizes over the channel axis: removing channels changes the others' statistics")
    for out in node.output:
        if out:
            for axis, labels in g.tracked(x).items():
                if axis not in normalized and axis < g.rank(out):
                    g.set_dim(out, axis, labels)


@register("LayerNormalization")
class LayerNorm(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x = node.input[0]
        rank = g.rank(x)
        start = int(attr(node, "axis", -1)) % rank
        labels = g.tracked(x).get(rank - 1)
        if g.approximate_norms and start == rank - 1 and labels is not None and not any(node.output[1:]):
            passthrough(g, x, node.output[0])
            for name, role in zip(node.input[1:3], ("affine", "bias"), strict=False):
                if name:
                    if not g.is_const(name) or g.shape(name) != (labels.size,):
                        raise Unmappable(BlockKind.FIXED_OPERAND, f"LayerNormalization parameter '{name}' is not "
                                                                  f"a constant [{labels.size}]")
                    g.set_dim(name, 0, labels, role)
            g.approximate(labels, node, APPROXIMATE)
            return
        _block_normalized(node, g, list(range(start, rank)))


@register("LpNormalization")
class LpNorm(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        _block_normalized(node, g, [int(attr(node, "axis", -1))])


@register("MeanVarianceNormalization")
class MVN(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        _block_normalized(node, g, [int(a) for a in attr(node, "axes", [0, 2, 3])])


@register("LRN")
class LRN(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        _block_normalized(node, g, [1])


@register("GroupNormalization")
class GroupNorm(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x = node.input[0]
        labels = g.tracked(x).get(1)
        if labels is not None:
            groups = int(attr(node, "num_groups"))
            per_group = labels.size // groups
            firsts = union_blocks(g, labels, per_group)
            for name, role in zip(node.input[1:3], ("affine", "bias"), strict=False):
                if not g.is_const(name):
                    raise Unmappable(BlockKind.FIXED_OPERAND, f"GroupNormalization parameter '{name}' is not constant")
                g.set_dim(name, 0, labels if g.shape(name)[0] == labels.size else firsts, role)
        # group statistics also run over every spatial axis: channels tracked there block, and the
        # other axes pass even when the channel axis itself is fixed (never silently dropped)
        _block_normalized(node, g, list(range(2, g.rank(x))))

    def rewrite(self, node: NodeProto, sx: SurgeryContext) -> None:
        old_c = sx.old_shape(node.input[0])[1]
        per_group = old_c // int(attr(node, "num_groups"))
        set_attr(node, "num_groups", sx.new_shape(node.input[0])[1] // per_group)

