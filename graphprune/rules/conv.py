"""Conv and ConvTranspose (1D/2D/3D), incl. grouped and depthwise with a channel multiplier.

Every group of a grouped conv must keep the same width. Many narrow groups (ResNeXt's 32x4d,
depthwise with one input channel per group) lose whole groups: one group's channels are one
unit, and a depthwise output block of `multiplier` channels follows each input channel. A few
wide groups (ResNeSt's radix slots, 4 groups of 8) lose the same positions in every group
instead: input position i of all groups is one unit, output position j another.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from onnx import NodeProto

from graphprune.elements import Labels
from graphprune.onnxutil import attr, set_attr
from graphprune.reasons import BlockKind, Unmappable
from graphprune.rules.common import union_blocks
from graphprune.rules.registry import Rule, register

if TYPE_CHECKING:
    from graphprune.depgraph import DependencyGraph
    from graphprune.surgery import SurgeryContext


def _weight(node: NodeProto, g: DependencyGraph) -> str:
    w = node.input[1]
    if not g.is_const(w):
        raise Unmappable(BlockKind.UNSUPPORTED_OP, f"{node.op_type} weight '{w}' is not a constant")
    return w


def _input_labels(node: NodeProto, g: DependencyGraph, group: int) -> Labels | None:
    labels = g.tracked(node.input[0]).get(1)
    if labels is None and group > 1:
        raise Unmappable(BlockKind.FIXED_OPERAND, "grouped conv whose input channels are fixed")
    return labels


def _grouped(g: DependencyGraph, in_labels: Labels, per_group_in: int, per_group_out: int) -> Labels:
    """Output labels of a grouped conv: each group's outputs follow its (fused) inputs."""
    firsts = union_blocks(g, in_labels, per_group_in)
    return np.repeat(firsts, per_group_out)


def _within_groups(node: NodeProto, g: DependencyGraph, w: str, in_labels: Labels, group: int) -> Labels:
    """Output labels of a conv with a few wide groups: position j of every group is one unit."""
    rows = in_labels.reshape(group, -1)
    g.union(rows.reshape(-1), np.tile(rows[0], group))
    g.set_dim(w, 1, rows[0].copy(), "in")
    return np.tile(g.new_space(node, node.output[0], g.shape(w)[0] // group), group)


def _other_axes(node: NodeProto, g: DependencyGraph) -> None:
    """Channels tracked on the input's non-channel axes (a Linear's features used as a batch or a
    spatial axis) are never dropped: samples are independent, so the batch axis passes; the kernel
    slides along (mixes, and may resize) the spatial axes, so those block."""
    x, y = node.input[0], node.output[0]
    for axis, labels in g.tracked(x).items():
        if axis == 0:
            g.set_dim(y, 0, labels)
        elif axis >= 2:
            g.block(labels, BlockKind.LAYOUT, node, f"{node.op_type} kernel slides along channel axis {axis}")


def _set_out(node: NodeProto, g: DependencyGraph, w: str, w_axis: int, out: Labels) -> None:
    g.set_dim(w, w_axis, out, "out")
    if len(node.input) > 2 and node.input[2]:
        g.set_dim(node.input[2], 0, out, "bias")
    g.set_dim(node.output[0], 1, out)


def _rewrite_group(node: NodeProto, sx: SurgeryContext, per_group_in: int) -> None:
    group = int(attr(node, "group", 1))
    if group > 1:
        set_attr(node, "group", sx.new_shape(node.input[0])[1] // per_group_in)


@register("Conv")
class ConvRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        w = _weight(node, g)
        group = int(attr(node, "group", 1))
        cout, per_group_in = g.shape(w)[0], g.shape(w)[1]
        x_labels = _input_labels(node, g, group)
        if x_labels is None or group == 1:
            out = g.new_space(node, node.output[0], cout)
            if x_labels is not None:
                g.set_dim(w, 1, x_labels, "in")
        elif group <= per_group_in:
            out = _within_groups(node, g, w, x_labels, group)
        else:
            out = _grouped(g, x_labels, per_group_in, cout // group)
        g.consume(node, 0, 1)
        _set_out(node, g, w, 0, out)
        _other_axes(node, g)

    def rewrite(self, node: NodeProto, sx: SurgeryContext) -> None:
        _rewrite_group(node, sx, sx.new_shape(node.input[1])[1])

    def macs(self, node: NodeProto, shape: Callable[[str], tuple[int, ...]]) -> int:
        return math.prod(shape(node.output[0])) * math.prod(shape(node.input[1])[1:])


@register("ConvTranspose")
class ConvTransposeRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        w = _weight(node, g)
        group = int(attr(node, "group", 1))
        cin, per_group_out = g.shape(w)[0], g.shape(w)[1]
        x_labels = _input_labels(node, g, group)
        if x_labels is None or group == 1:
            out = g.new_space(node, node.output[0], per_group_out)
            if x_labels is not None:
                g.set_dim(w, 0, x_labels, "in")
            _set_out(node, g, w, 1, out)
        else:
            out = _grouped(g, x_labels, cin // group, per_group_out)
            g.set_dim(w, 0, x_labels, "in")
            g.set_dim(node.output[0], 1, out)
            if len(node.input) > 2 and node.input[2]:
                g.set_dim(node.input[2], 0, out, "bias")
        g.consume(node, 0, 1)
        _other_axes(node, g)

    def rewrite(self, node: NodeProto, sx: SurgeryContext) -> None:
        group = int(attr(node, "group", 1))
        _rewrite_group(node, sx, sx.old_shape(node.input[1])[0] // group)

    def macs(self, node: NodeProto, shape: Callable[[str], tuple[int, ...]]) -> int:
        return math.prod(shape(node.input[0])) * math.prod(shape(node.input[1])[1:])
