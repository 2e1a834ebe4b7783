"""A differentiable view of an ONNX model: its graph run node by node in torch, its weights as parameters.

Why its own thin interpreter and not a converter package: the view must map back onto the model
exactly, and here that is free: every trainable parameter *is* one initializer, by name, so the trained
values are written back into the same initializers of the same graph (`write_back`), with nothing
matched by value. The converters that exist pull torchvision (which replaces the CPU torch build here)
and rename weights into module trees. Recovery checks the view against onnxruntime before it trains
it (`distill._verify`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from onnx import ModelProto, TensorProto, helper
from torch import Tensor, nn

from graphprune.recover.ops import OPS, Node, Unsupported
from graphprune.tensors import to_array
from graphprune.weights import is_mapped

# Inputs of an op that hold learned weights. A constant elsewhere (Resize scales, Clip bounds, a Pow
# exponent, masks, shape values) is structure and stays fixed. Elementwise operands count only as
# per-channel vectors (biases, scales): at most one axis longer than 1.
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "Gather": (0,),
    "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2), "PRelu": (1,),
}
VECTOR_SLOTS: dict[str, tuple[int, ...]] = {"Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "Concat": tuple(range(64))}
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE)


@dataclass(frozen=True)
class _Step:
    run: Any  # the op function
    node: Node
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    release: tuple[str, ...]  # tensors no later step reads


def weight_names(model: ModelProto) -> list[str]:
    """Initializers that are learned weights (see WEIGHT_SLOTS), float32/float64 and finite."""
    inits = {t.name: t for t in model.graph.initializer}
    names: dict[str, None] = {}
    for node in model.graph.node:
        slots = WEIGHT_SLOTS.get(node.op_type, ())
        vector = VECTOR_SLOTS.get(node.op_type, ())
        for i, name in enumerate(node.input):
            t = inits.get(name)
            if t is None or t.data_type not in _FLOAT_TYPES or i not in slots + vector:
                continue
            dims = list(t.dims)
            if i not in slots and (int(np.prod(dims)) < 2 or sum(d > 1 for d in dims) > 1):
                continue
            names[name] = None
    return [n for n in names if np.isfinite(to_array(inits[n])).all()]


class TorchGraph(nn.Module):
    """`model` as a torch module: `forward(feeds)` returns the graph outputs (and any `extra` tensors).

    `trainable` initializers become parameters (float32 or float64 as stored); the others are fixed
    tensors. Raises `Unsupported` when a node's op has no implementation in `ops.OPS`.
    """

    def __init__(self, model: ModelProto, trainable: Collection[str] = ()) -> None:
        super().__init__()
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        missing = sorted({f"{n.domain + '.' if n.domain not in ('', 'ai.onnx') else ''}{n.op_type}"
                          for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in OPS})
        if missing:
            raise Unsupported(f"no differentiable implementation of {', '.join(missing)}")
        self.input_names = [i.name for i in model.graph.input]
        self.output_names = [o.name for o in model.graph.output]
        wanted = set(trainable)
        self.names: list[str] = []
        params: list[nn.Parameter] = []
        self.fixed: dict[str, Tensor] = {}
        for init in model.graph.initializer:
            value = torch.from_numpy(np.array(to_array(init)))
            if init.name in wanted:
                self.names.append(init.name)
                params.append(nn.Parameter(value))
            else:
                self.fixed[init.name] = value
        self.weights = nn.ParameterList(params)
        self._steps = self._plan(model, opset)

    def _plan(self, model: ModelProto, opset: int) -> list[_Step]:
        last: dict[str, int] = {}
        for i, node in enumerate(model.graph.node):
            for name in node.input:
                last[name] = i
        keep = set(self.output_names) | set(self.names) | set(self.fixed)
        by_step: dict[int, list[str]] = {}
        for name, i in last.items():
            if name not in keep:
                by_step.setdefault(i, []).append(name)
        return [_Step(OPS[n.op_type], Node.of(n, opset), tuple(n.input), tuple(n.output), tuple(by_step.get(i, ())))
                for i, n in enumerate(model.graph.node)]

    def forward(self, feeds: Mapping[str, Tensor], extra: Sequence[str] = ()) -> dict[str, Tensor]:
        env: dict[str, Tensor] = {**self.fixed, **dict(zip(self.names, self.weights, strict=True)), **feeds}
        wanted = set(extra)
        for step in self._steps:
            args = [env[name] if name else None for name in step.inputs]
            try:
                out = step.run(step.node, args)
            except Unsupported:
                raise
            except Exception as exc:  # torch's errors name no node; the report must
                raise Unsupported(f"{step.node.op_type} node '{step.node.name}' failed in torch: {exc}") from exc
            outs = [out] if isinstance(out, Tensor) else list(out)
            for name, value in zip(step.outputs, outs, strict=False):
                if name and value is not None:
                    env[name] = value
            for name in step.release:
                if name not in wanted:
                    env.pop(name, None)
        return {name: env[name] for name in [*self.output_names, *extra]}

    def values(self) -> dict[str, NDArray[Any]]:
        """A copy of the trainable weights' current values, by initializer name (a copy: the optimizer
        updates the parameters in place, and a checkpoint must not follow them)."""
        return {n: p.detach().cpu().numpy().copy() for n, p in zip(self.names, self.weights, strict=True)}

    def load_values(self, values: Mapping[str, NDArray[Any]]) -> None:
        with torch.no_grad():
            for name, p in zip(self.names, self.weights, strict=True):
                p.copy_(torch.from_numpy(np.asarray(values[name])))


def write_back(model: ModelProto, values: Mapping[str, NDArray[Any]]) -> ModelProto:
    """A copy of `model` whose initializers named in `values` hold those values: same name, dims, dtype
    and storage field; the graph, every other initializer, the opset and the metadata are untouched."""
    out = ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name not in values:
            continue
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        array = np.asarray(values[init.name]).astype(dtype)
        if tuple(array.shape) != tuple(init.dims):
            raise ValueError(f"initializer '{init.name}' has dims {list(init.dims)}, got {list(array.shape)}")
        if is_mapped(init):  # the new value lives in the proto, not in the file it was mapped from
            del init.external_data[:]
            init.data_location = TensorProto.DEFAULT
        if init.HasField("raw_data") or not (init.float_data or init.double_data):
            init.raw_data = array.astype(dtype.newbyteorder("<")).tobytes()
            del init.float_data[:]
            del init.double_data[:]
        elif init.float_data:
            init.float_data[:] = array.ravel().tolist()
        else:
            init.double_data[:] = array.ravel().tolist()
    return out
