"""BatchNormalization folded into the layer that produces its input.

A pruned model keeps every inference-mode BatchNormalization after its Conv, ConvTranspose or Gemm: its
parameters, and one more pass over each activation in a runtime that does not fuse the two itself
(onnxruntime does at its default level; onnxslim folded 35 of a pruned PP-OCR classifier's, 286.7 -> 269
KB). Per channel the normalization is the affine map y = f·x + (B - f·mean), f = scale / sqrt(var +
eps), so it goes exactly into the producer's weight and bias. Only what folds without assumptions is
folded: the producer's output feeds the BN alone, its weight and bias are constants it alone reads, the
BN's parameters are constants and only its first output is used; anything else is left as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import GraphProto, ModelProto, NodeProto, numpy_helper

from graphprune.onnxutil import attr, set_attr
from graphprune.protowalk import (
    DEFAULT_DOMAINS,
    all_names,
    delete_at,
    fixed_initializers,
    fresh_name,
    node_reads,
    read_counts,
)
from graphprune.tensors import to_array
from graphprune.weights import Spill, is_mapped

__all__ = ["fold_batchnorms", "folded_affine"]

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# From opset 9 BatchNormalization has no `spatial` (per-position parameters) and no `is_test` (training
# by default before 7); IR >= 4 initializers need not be graph inputs, so dropping one is only that.
_MIN_OPSET = 9
_MIN_IR = 4


def folded_affine(weight: NDArray[Any], bias: NDArray[Any], scale: NDArray[Any], shift: NDArray[Any],
                  mean: NDArray[Any], var: NDArray[Any], epsilon: float,
                  axis: int) -> tuple[NDArray[Any], NDArray[Any]]:
    """The layer (weight, per-channel bias) followed by the normalization, as one layer: (W·f along the
    output-channel `axis`, (b - mean)·f + shift), f = scale / sqrt(var + epsilon). Computed in float64
    (a float16 layer would lose bits to the product) and returned in the weight's dtype."""
    f = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
    shape = [1] * weight.ndim
    shape[axis] = -1
    w = weight.astype(np.float64) * f.reshape(shape)
    b = (bias.astype(np.float64) - mean.astype(np.float64)) * f + shift.astype(np.float64)
    return w.astype(weight.dtype), b.astype(weight.dtype)


def fold_batchnorms(model: ModelProto) -> int:
    """Fold every foldable BatchNormalization of the main graph into its producer, in place; the producer
    then writes the BN's output name, so graph outputs keep theirs. Returns how many were folded."""
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
    if opset < _MIN_OPSET or model.ir_version < _MIN_IR:
        return 0
    folder = _Folder(model.graph)
    folded = []
    for i, node in enumerate(model.graph.node):
        site = folder.site(node)
        if site is not None:
            folder.fold(node, site)
            folded.append(i)
    folder.finish(folded)
    return len(folded)


@dataclass
class _Site:
    """A BN's producer that folds: its weight, scaled along `axis`, its bias (None: it has none, a new
    one is added) as the per-channel vector the layer adds, and the BN's scale, B, mean and var."""

    node: NodeProto
    weight: str
    weight_value: NDArray[Any]
    axis: int
    bias: str | None
    bias_value: NDArray[Any]
    params: list[NDArray[Any]]


class _Folder:
    """The graph's constants, readers and producers, kept current as BNs fold (a producer that took one
    BN can take the next)."""

    def __init__(self, graph: GraphProto) -> None:
        self.graph = graph
        self.consts = fixed_initializers(graph)
        self.reads = read_counts(graph)
        self.producers = {name: node for node in graph.node for name in node.output}
        self.ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in [*graph.input, *graph.value_info,
                      *graph.output] if vi.type.tensor_type.HasField("shape")}
        self.taken = all_names(graph)
        self.replaced: list[str] = []  # the producers' old output names
        self.unread: set[str] = set()  # the folded BNs' parameters (dropped where nothing else reads them)
        self.spill: Spill | None = None

    def own(self, name: str) -> bool:
        """A constant that exactly one node reads (so changing it changes nothing else)."""
        return name in self.consts and self.reads[name] == 1

    def value(self, name: str) -> NDArray[Any]:
        return to_array(self.consts[name])

    def site(self, bn: NodeProto) -> _Site | None:
        """Where `bn` folds, or None when it is not an inference-mode BN with a foldable producer."""
        if bn.op_type != "BatchNormalization" or bn.domain not in DEFAULT_DOMAINS or len(bn.input) != 5:
            return None
        if attr(bn, "training_mode", 0) or any(self.reads[o] for o in bn.output[1:] if o):
            return None
        node = self.producers.get(bn.input[0])
        if (node is None or node.domain not in DEFAULT_DOMAINS or self.reads[bn.input[0]] != 1
                or len(node.input) < 2 or not self.own(node.input[1])
                or not all(p in self.consts for p in bn.input[1:])):
            return None
        weight = self.value(node.input[1])
        axis = self._axis(node, weight)
        if axis is None or weight.dtype not in _FLOATS:
            return None
        channels = weight.shape[axis]
        params = [self.value(p) for p in bn.input[1:]]
        if any(p.dtype not in _FLOATS or p.shape != (channels,) for p in params):
            return None
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is None:
            return _Site(node, node.input[1], weight, axis, None, np.zeros(channels), params)
        if not self.own(bias):
            return None
        value = self._bias(node, self.value(bias), channels)
        return None if value is None else _Site(node, node.input[1], weight, axis, bias, value, params)

    def _axis(self, node: NodeProto, weight: NDArray[Any]) -> int | None:
        """The weight axis of the producer's output channels (its output's axis 1, the one BN normalizes)."""
        if node.op_type == "Conv" and weight.ndim >= 3:
            return 0
        if node.op_type == "ConvTranspose" and weight.ndim >= 3 and attr(node, "group", 1) == 1:
            return 1  # grouped: W's axis 1 holds one group's channels only
        if node.op_type == "Gemm" and weight.ndim == 2:
            return 0 if attr(node, "transB", 0) else 1
        if node.op_type == "MatMul" and weight.ndim == 2 and self.ranks.get(node.input[0]) == 2:
            return 1  # a 2-D product: its features are axis 1 (of a batched one, BN would normalize tokens)
        return None

    @staticmethod
    def _bias(node: NodeProto, bias: NDArray[Any], channels: int) -> NDArray[Any] | None:
        """The per-channel vector the producer adds, or None when its bias varies along other axes."""
        if node.op_type in ("Conv", "ConvTranspose"):
            return bias if bias.shape == (channels,) else None
        if bias.shape not in ((), (1,), (1, 1), (channels,), (1, channels)):
            return None  # a Gemm C with rows of its own
        return attr(node, "beta", 1.0) * np.broadcast_to(bias.astype(np.float64).reshape(-1), (channels,))

    def fold(self, bn: NodeProto, site: _Site) -> None:
        scale, shift, mean, var = site.params
        weight, bias = folded_affine(site.weight_value, site.bias_value, scale, shift, mean, var,
                                     float(attr(bn, "epsilon", 1e-5)), site.axis)
        node = site.node
        self._put(site.weight, weight)
        if site.bias is not None:
            self._put(site.bias, bias)
        else:
            name = fresh_name(f"{site.weight}_bias", self.taken)
            self._put(name, bias)
            if node.op_type == "MatMul":
                node.op_type = "Gemm"  # the same 2-D product, with the bias it now needs
            if len(node.input) > 2:
                node.input[2] = name
            else:
                node.input.append(name)
        if node.op_type == "Gemm" and attr(node, "beta", 1.0) != 1.0:
            set_attr(node, "beta", 1.0)  # the new bias has beta in it
        self.replaced.append(node.output[0])
        node.output[0] = bn.output[0]
        self.producers[bn.output[0]] = node
        self.reads.subtract(node_reads(bn))
        self.unread.update(bn.input[1:])

    def _put(self, name: str, value: NDArray[Any]) -> None:
        """Initializer `name` set to a new tensor holding `value`. The old one's data stays as it was: a
        mapped tensor's file is the user's or an earlier stage's, so its replacement goes to a scratch file
        of its own, as surgery's do (`weights.Spill`)."""
        old = self.consts.get(name)
        if old is not None and is_mapped(old):
            self.spill = self.spill or Spill()
            new = self.spill.tensor(name, value)
        else:
            new = numpy_helper.from_array(np.ascontiguousarray(value), name)
        if old is None:
            self.graph.initializer.append(new)
            self.consts[name] = self.graph.initializer[-1]
            self.reads[name] += 1
        else:
            old.CopyFrom(new)

    def finish(self, folded: list[int]) -> None:
        """Drop the folded BNs, the parameters no one reads any more and the producers' old outputs' shapes."""
        graph = self.graph
        delete_at(graph.node, folded)
        delete_at(graph.initializer, [i for i, t in enumerate(graph.initializer)
                                      if t.name in self.unread and self.reads[t.name] <= 0])
        replaced = set(self.replaced)
        delete_at(graph.value_info, [i for i, vi in enumerate(graph.value_info) if vi.name in replaced])
        if self.spill is not None:
            self.spill.close()
