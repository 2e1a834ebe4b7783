"""Decomposed HardSwish fused: x * clip(x + 3, 0, 6) / 6 as one op.

paddle2onnx writes HardSwish as four elementwise nodes (Add, Clip, Mul, Div: PP-OCR, PicoDet), each a
pass over an activation that MACs do not count; they are a quarter to a half of those graphs' kernel time
(benchmarks/README.md). From opset 14 the four become one HardSwish, before it HardSigmoid (alpha 1/6,
beta 0.5) and a Mul. The same function computed in another order, so the outputs differ by float
rounding: opt-in (`fuse_activations`), and the validation measures the difference like any other.
Only the exact pattern is taken: each intermediate read by the next node alone, the constants scalars.
"""

from __future__ import annotations

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper

from graphprune.onnxutil import attr
from graphprune.protowalk import (
    DEFAULT_DOMAINS,
    all_names,
    delete_at,
    fixed_initializers,
    fresh_name,
    is_constant,
    node_reads,
    read_counts,
)
from graphprune.tensors import constant_tensor, to_array

__all__ = ["fuse_hardswish"]

_HARDSIGMOID_OPSET = 6
_HARDSWISH_OPSET = 14
_CLIP_INPUTS_OPSET = 11  # before it Clip's bounds are attributes


def fuse_hardswish(model: ModelProto) -> int:
    """Fuse every decomposed HardSwish of the main graph, in place; the fused op writes the Div's output
    name, so graph outputs keep theirs. Returns how many were fused."""
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
    if opset < _HARDSIGMOID_OPSET:
        return 0
    fuser = _Fuser(model.graph, opset)
    fused = [fuser.fuse(node) for node in list(model.graph.node)]
    fuser.finish()
    return sum(fused)


class _Fuser:
    def __init__(self, graph: GraphProto, opset: int) -> None:
        self.graph, self.opset = graph, opset
        self.consts = fixed_initializers(graph)
        self.consts.update({n.output[0]: constant_tensor(n) for n in graph.node if is_constant(n)})
        self.reads = read_counts(graph)
        self.producers = {name: node for node in graph.node for name in node.output}
        self.taken = all_names(graph)
        self.dropped: set[int] = set()  # id() of the nodes fused away
        self.gone: set[str] = set()  # the intermediates they wrote
        self.freed: set[str] = set()  # what they read (constants only they read are dropped)

    def _scalar(self, name: str, value: float) -> bool:
        tensor = self.consts.get(name)
        if tensor is None or tensor.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            return False
        array = to_array(tensor)
        return array.size == 1 and bool(np.isclose(float(array.reshape(-1)[0]), value, rtol=0, atol=1e-6))

    def _only(self, name: str, op: str) -> NodeProto | None:
        """The node of type `op` producing `name`, where nothing else reads `name`."""
        node = self.producers.get(name)
        ok = node is not None and node.op_type == op and node.domain in DEFAULT_DOMAINS and self.reads[name] == 1
        return node if ok else None

    def _bounds(self, clip: NodeProto) -> bool:
        if self.opset < _CLIP_INPUTS_OPSET:
            return attr(clip, "min", None) == 0.0 and attr(clip, "max", None) == 6.0
        return len(clip.input) == 3 and self._scalar(clip.input[1], 0.0) and self._scalar(clip.input[2], 6.0)

    def fuse(self, div: NodeProto) -> bool:
        """Fuse the HardSwish ending at `div` (Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)), if it is one."""
        if div.op_type != "Div" or div.domain not in DEFAULT_DOMAINS or not self._scalar(div.input[1], 6.0):
            return False
        mul = self._only(div.input[0], "Mul")
        if mul is None:
            return False
        for x, clipped in (mul.input, mul.input[::-1]):
            clip = self._only(clipped, "Clip")
            add = None if clip is None or not self._bounds(clip) else self._only(clip.input[0], "Add")
            if clip is None or add is None or len(add.input) != 2 or x not in add.input:
                continue
            three = [name for name in add.input if name != x]
            if len(three) == 1 and self._scalar(three[0], 3.0):
                self._replace(div, x, [add, clip, mul])
                return True
        return False

    def _replace(self, div: NodeProto, x: str, dead: list[NodeProto]) -> None:
        out = div.output[0]
        if self.opset >= _HARDSWISH_OPSET:
            new = [helper.make_node("HardSwish", [x], [out], name=div.name)]
        else:
            hs = fresh_name(f"{out}_hardsigmoid", self.taken)
            new = [helper.make_node("HardSigmoid", [x], [hs], name=hs, alpha=1.0 / 6.0, beta=0.5),
                   helper.make_node("Mul", [x, hs], [out], name=div.name)]
        for node in (*dead, div):
            self.reads.subtract(node_reads(node))
        for node in new:
            self.reads.update(node.input)
        position = next(i for i, n in enumerate(self.graph.node) if n is div)
        for offset, node in enumerate(new, start=1):
            self.graph.node.insert(position + offset, node)
        self.dropped.update(id(n) for n in (*dead, div))
        self.gone.update(name for node in dead for name in node.output)
        self.freed.update(name for node in (*dead, div) for name in node.input)

    def finish(self) -> None:
        """Drop the fused nodes, the constants no one reads any more and the intermediates' shapes."""
        unread = {name for name in self.freed if self.reads[name] <= 0}
        delete_at(self.graph.node, [i for i, n in enumerate(self.graph.node)
                                    if id(n) in self.dropped or (is_constant(n) and n.output[0] in unread)])
        delete_at(self.graph.initializer, [i for i, t in enumerate(self.graph.initializer) if t.name in unread])
        delete_at(self.graph.value_info, [i for i, v in enumerate(self.graph.value_info) if v.name in self.gone])
