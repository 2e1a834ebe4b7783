"""Pooling, Resize and Pad: they act on spatial axes and leave channels alone, unless they touch
the channel axis (channel padding or scaling), which blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx import NodeProto

from graphprune.onnxutil import attr, ints
from graphprune.reasons import BlockKind, Unmappable
from graphprune.rules.common import axes_of, passthrough
from graphprune.rules.layout import check_shape_entries, rewrite_shape_entries
from graphprune.rules.registry import Rule, register

if TYPE_CHECKING:
    from graphprune.depgraph import DependencyGraph
    from graphprune.surgery import SurgeryContext

POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")


@register(*POOLS)
class PoolRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x = node.input[0]
        if any(a >= 2 for a in g.tracked(x)):
            raise Unmappable(BlockKind.LAYOUT, f"{node.op_type} pools over a channel axis")
        if len(node.output) > 1 and node.output[1] and g.tracked(x):
            raise Unmappable(BlockKind.LAYOUT, "MaxPool indices encode the channel count")
        passthrough(g, x, node.output[0])


@register("Resize", "Upsample")
class ResizeRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x, y = node.input[0], node.output[0]
        for axis in g.tracked(x):
            if g.shape(x)[axis] != g.shape(y)[axis]:
                raise Unmappable(BlockKind.LAYOUT, f"{node.op_type} scales channel axis {axis}")
        passthrough(g, x, y)
        if self._sizes(node) is not None:
            check_shape_entries(node, g, self._sizes(node) or "", y, self._axes(node, g))

    @staticmethod
    def _sizes(node: NodeProto) -> str | None:
        if node.op_type == "Resize" and len(node.input) > 3 and node.input[3]:
            return node.input[3]
        return None

    @staticmethod
    def _axes(node: NodeProto, g: DependencyGraph) -> list[int] | None:
        """Resize-18's `axes`: `sizes` then holds entries for these axes only, in this order."""
        axes = attr(node, "axes")
        return None if axes is None else [int(a) % g.rank(node.input[0]) for a in axes]

    def rewrite(self, node: NodeProto, sx: SurgeryContext) -> None:
        sizes = self._sizes(node)
        if sizes is not None:
            rewrite_shape_entries(sx, sizes, node.output[0], frozenset(), self._axes(node, sx.graph))


@register("Pad")
class PadRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        x = node.input[0]
        rank = g.rank(x)
        if g.opset < 11:
            pads = [int(p) for p in attr(node, "pads")]
            axes = list(range(rank))
        else:
            if not g.is_const(node.input[1]):
                raise Unmappable(BlockKind.SHAPE_NOT_REWRITABLE, "Pad amounts are computed at run time")
            pads = ints(g.const(node.input[1]))
            axes = [a % rank for a in (axes_of(node, g, 3) or range(rank))]
        n = len(axes)
        for i, axis in enumerate(axes):
            if axis in g.tracked(x) and (pads[i] or pads[i + n]):
                raise Unmappable(BlockKind.LAYOUT, f"Pad pads channel axis {axis}")
        passthrough(g, x, node.output[0])
