"""Elementwise ops: unary ops keep channels; broadcasting ops couple every operand."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx import NodeProto

from graphprune.rules.common import couple_broadcast, passthrough
from graphprune.rules.registry import Rule, register

if TYPE_CHECKING:
    from graphprune.depgraph import DependencyGraph

UNARY = (
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan",
    "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Not", "IsNaN", "IsInf", "Cast", "CastLike",
    "Identity", "Dropout", "Shrink", "BitwiseNot",
)
BROADCAST = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Where", "PRelu", "Clip", "Mod",
    "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "BitShift",
    "BitwiseAnd", "BitwiseOr", "BitwiseXor",
)


@register(*UNARY)
class Unary(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        for out in node.output:
            if out:
                passthrough(g, node.input[0], out)


@register(*BROADCAST)
class Broadcast(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        couple_broadcast(node, g, list(node.input), node.output[0])
