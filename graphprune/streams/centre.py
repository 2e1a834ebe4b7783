"""LayerNorm streams made RMSNorm streams, exactly, so that `rotate.py` can slice them too.

LayerNorm(x) = (x - mean(x)) / rms(x - mean(x)) * g + b. When every term added to the stream (the
embedding rows, position tables, each writer's weight columns and bias) has zero mean over the
width, so has the stream, and LayerNorm reads it as x / rms(x) * g + b: an RMSNorm followed by
the shift b, which is a constant the readers add (b·W goes into their bias). Subtracting the mean
from every writer changes the stream only by a multiple of the all-ones direction, which every
LayerNorm removes anyway, so the model computes the same function (SliceGPT's first step).
Only streams whose every reader is such a LayerNorm qualify (`find_streams(layernorm=True)`).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto, NodeProto, helper, numpy_helper

from graphprune.onnxutil import attr, node_name
from graphprune.protowalk import all_names, fresh_name
from graphprune.streams.find import Stream, find_streams
from graphprune.tensors import to_array


def layernorm_as_rms(model: ModelProto) -> tuple[ModelProto | None, list[str], list[str]]:
    """(a copy of `model` in which every LayerNorm-read stream is an RMSNorm stream, or None if it has
    none; the embeddings of those streams; why the other embedding-started streams are not)."""
    streams, refused = find_streams(model, layernorm=True)
    if not streams:
        return None, [], refused
    rewritten = copy.deepcopy(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    rewriter = _Rewriter(rewritten, opset)
    for stream in find_streams(rewritten, layernorm=True)[0]:
        rewriter.run(stream)
    rewriter.rebuild()  # once, after every stream: the found nodes belong to the graph as it was
    return rewritten, [s.embedding for s in streams], refused


class _Rewriter:
    def __init__(self, model: ModelProto, opset: int) -> None:
        self.model = model
        self.opset = opset
        self.inits = {t.name: t for t in model.graph.initializer}
        self.taken = all_names(model.graph)
        self.instead: dict[str, list[NodeProto]] = {}  # a node's first output -> the nodes that take its place
        self.shifts: set[str] = set()

    def run(self, stream: Stream) -> None:
        self._centre(stream.embedding, axis=1)
        for table in stream.tables:
            self._centre(table, axis=-1)
        for weight, bias in stream.writers:
            self._centre(weight, axis=1)
            if bias is not None:
                self._centre(bias, axis=0)
        for ln, readers in stream.layernorms:
            self.shifts.add(ln.input[2])
            shift = self.value(ln.input[2]).astype(np.float64)
            for reader in readers:
                self._add_bias(reader, shift @ self.value(reader.input[1]).astype(np.float64))
            self._replace(ln)

    # ---- values ----------------------------------------------------------------------------------
    def value(self, name: str) -> NDArray[Any]:
        return to_array(self.inits[name])

    def put(self, name: str, value: NDArray[Any]) -> None:
        self.inits[name].CopyFrom(numpy_helper.from_array(value.astype(self.value(name).dtype), name))

    def new_init(self, base: str, value: NDArray[Any]) -> str:
        name = fresh_name(base, self.taken)
        tensor = numpy_helper.from_array(value, name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def _centre(self, name: str, axis: int) -> None:
        value = self.value(name).astype(np.float64)
        self.put(name, value - value.mean(axis=axis, keepdims=True))

    # ---- graph -----------------------------------------------------------------------------------
    def _add_bias(self, reader: NodeProto, shift: NDArray[np.float64]) -> None:
        """The reader's output gains `shift` ([m]): into a Gemm's C, else an Add after it."""
        dtype = self.value(reader.input[1]).dtype
        if reader.op_type == "Gemm" and len(reader.input) > 2 and reader.input[2]:
            self.put(reader.input[2], self.value(reader.input[2]).astype(np.float64) + shift)
            return
        bias = self.new_init(f"{reader.input[1]}_ln_shift", shift.astype(dtype))
        if reader.op_type == "Gemm":
            while len(reader.input) < 3:
                reader.input.append("")
            reader.input[2] = bias
            return
        out = reader.output[0]
        reader.output[0] = self.fresh(f"{out}_unshifted")
        add = helper.make_node("Add", [reader.output[0], bias], [out], name=self.fresh(f"{node_name(reader)}_ln_shift"))
        self.instead[reader.output[0]] = [reader, add]

    def _replace(self, ln: NodeProto) -> None:
        """LayerNormalization(x, g, b) -> x * 1/sqrt(mean(x^2) + eps) * g (b went to the readers)."""
        x, scale, out = ln.input[0], ln.input[1], ln.output[0]
        dtype = self.value(scale).dtype
        base = node_name(ln)
        two = self.new_init(f"{base}_two", np.array(2.0, dtype))
        eps = self.new_init(f"{base}_eps", np.array(float(attr(ln, "epsilon", 1e-5)), dtype))
        names = [self.fresh(f"{base}_{k}") for k in ("sq", "ms", "var", "rms", "inv", "normalized")]
        if self.opset >= 18:
            axes = self.new_init(f"{base}_axes", np.array([-1], np.int64))
            mean = helper.make_node("ReduceMean", [names[0], axes], [names[1]], keepdims=1)
        else:
            mean = helper.make_node("ReduceMean", [names[0]], [names[1]], axes=[-1], keepdims=1)
        nodes = [
            helper.make_node("Pow", [x, two], [names[0]]), mean,
            helper.make_node("Add", [names[1], eps], [names[2]]),
            helper.make_node("Sqrt", [names[2]], [names[3]]),
            helper.make_node("Reciprocal", [names[3]], [names[4]]),
            helper.make_node("Mul", [x, names[4]], [names[5]]),
            helper.make_node("Mul", [names[5], scale], [out]),
        ]
        for k, node in enumerate(nodes):
            node.name = self.fresh(f"{base}_rms_{k}")
        self.instead[out] = nodes

    def rebuild(self) -> None:
        """The node list with every replacement in place (order kept: the graph stays sorted)."""
        ordered: list[NodeProto] = []
        for node in self.model.graph.node:
            ordered.extend(self.instead.get(node.output[0], [node]) if node.output else [node])
        copies = [NodeProto() for _ in ordered]
        for fresh, node in zip(copies, ordered, strict=True):
            fresh.CopyFrom(node)
        del self.model.graph.node[:]
        self.model.graph.node.extend(copies)
        self.instead.clear()
        used = {i for node in self.model.graph.node for i in node.input} | {o.name for o in self.model.graph.output}
        unused = [t for t in self.model.graph.initializer if t.name not in used and t.name in self.shifts]
        for t in unused:  # the LayerNorms' shifts, now in the readers' biases
            self.model.graph.initializer.remove(t)
            del self.inits[t.name]

    def fresh(self, base: str) -> str:
        return fresh_name(base, self.taken)
