"""LSTM, GRU and RNN: hidden units are a fresh space, the input features a consumed axis.

Hidden unit j owns row j of every gate block of W and R ([dirs, gates*H, ...]), of both bias halves
of B ([dirs, 2*gates*H]) and of the peepholes P ([dirs, 3H]), and position j of the last axis of
initial_h/initial_c, Y, Y_h and Y_c. Both directions of a bidirectional op share that axis of Y, so
one label covers both directions' slices. Everything else a unit touches inside the op is elementwise
per unit (gates, clip, activations, GRU's reset either way), except the recurrence R·h_{t-1}: column j
of R reads unit j, which is why R's last axis is labelled too and recorded as a consumer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from onnx import NodeProto

from graphprune import shapeflow
from graphprune.onnxutil import node_name, set_attr
from graphprune.reasons import BlockKind, Unmappable
from graphprune.rules.layout import rewrite_shape_entries
from graphprune.rules.registry import Rule, register

if TYPE_CHECKING:
    from graphprune.depgraph import DependencyGraph
    from graphprune.surgery import SurgeryContext

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# input indices: X, W, R, B, sequence_lens, initial_h, (LSTM) initial_c, P
B, INITIAL_H, INITIAL_C, P = 3, 5, 6, 7


def _optional(node: NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _states(node: NodeProto) -> list[str]:
    return [s for s in (_optional(node, INITIAL_H), _optional(node, INITIAL_C) if node.op_type == "LSTM" else "")
            if s]


def _fill_shape(g: DependencyGraph, node: NodeProto, state: str) -> str | None:
    """The shape vector of the ConstantOfShape that makes `state` (exporters' zeros for a run-time batch
    size) when its hidden-size entry is a rewritable constant: a uniform fill holds for any unit count.
    Only when nothing else reads the state, the vector or that constant: they would keep the old size."""
    producer = g.producer.get(state)
    if producer is None or producer.op_type != "ConstantOfShape" \
            or any(node_name(u) != node_name(node) for u in g.users.get(state, [])):
        return None
    shape = producer.input[0]
    values = shapeflow.entries(g, shape)
    entry = values[-1] if values else None
    if not isinstance(entry, shapeflow.ConstRef) or len(g.users.get(shape, [])) != 1:
        return None
    return shape if entry.tensor == shape or g.users.get(entry.tensor) == [g.producer.get(shape)] else None


@register("LSTM", "GRU", "RNN")
class RecurrentRule(Rule):
    def analyze(self, node: NodeProto, g: DependencyGraph) -> None:
        from graphprune.depgraph import Consume  # depgraph imports the rules package

        x, w, r = node.input[:3]
        gates = GATES[node.op_type]
        lstm = node.op_type == "LSTM"
        params = [(w, "W"), (r, "R"), (_optional(node, B), "B")] + ([(_optional(node, P), "P")] if lstm else [])
        for name, what in params:
            if name and not g.is_const(name):
                raise Unmappable(BlockKind.FIXED_OPERAND, f"{node.op_type} {what} '{name}' is not constant")
        states = _states(node)
        handled = {x: 2, **dict.fromkeys(states, 2)}
        for name in filter(None, node.input):
            for axis, labels in g.tracked(name).items():
                if handled.get(name) != axis:  # time steps are mixed; batch / direction are not followed
                    g.block(labels, BlockKind.RECURRENT, node,
                            f"axis {axis} of '{name}' is neither input features nor hidden units")

        features = g.tracked(x).get(2)
        if features is not None:
            g.set_dim(w, 2, features, "in")
            g.consume(node, 0, 2)

        hidden = g.new_space(node, node.output[0] or node_name(node), g.shape(r)[2])
        g.set_dim(w, 1, np.tile(hidden, gates), "out")
        g.set_dim(r, 1, np.tile(hidden, gates), "out")
        g.set_dim(r, 2, hidden, "in")
        # a constant operand is never a recorded consumer (depgraph.consume), but R is the only place
        # the masked reference can cut a removed unit out of the recurrence
        g.consumes.append(Consume(node_name(node), 2, r, 2))
        if b := _optional(node, B):
            g.set_dim(b, 1, np.tile(hidden, 2 * gates), "bias")
        if lstm and (p := _optional(node, P)):
            g.set_dim(p, 1, np.tile(hidden, 3), "const")
        for s in states:
            if g.is_const(s):
                g.set_dim(s, 2, hidden, "const")
            elif 2 in g.tracked(s) or _fill_shape(g, node, s) is not None:
                g.set_dim(s, 2, hidden)  # another recurrent op's units, or zeros sized at run time
            else:
                g.block(hidden, BlockKind.FIXED_OPERAND, node, f"initial state '{s}' has fixed hidden units")
        for out in node.output:
            if out:
                g.set_dim(out, -1, hidden)

    def rewrite(self, node: NodeProto, sx: SurgeryContext) -> None:
        set_attr(node, "hidden_size", sx.new_shape(node.input[2])[2])
        for s in set(_states(node)):
            if not sx.graph.is_const(s) and (shape := _fill_shape(sx.graph, node, s)) is not None:
                rewrite_shape_entries(sx, shape, s, frozenset())

    def macs(self, node: NodeProto, shape: Callable[[str], tuple[int, ...]]) -> int:
        """Per time step and sequence, W·x and R·h of every direction (layout only swaps X's first axes)."""
        x = shape(node.input[0])
        return x[0] * x[1] * (math.prod(shape(node.input[1])) + math.prod(shape(node.input[2])))
