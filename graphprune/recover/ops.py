"""Torch implementations of ONNX operators: the one table the differentiable view runs.

Each entry takes the node (its attributes, opset and output count) and its input tensors (None for an
omitted optional input) and returns the output tensor(s). Semantics follow the ONNX operator spec for
the opsets exporters emit (7 to 21); where torch has no exact counterpart for an attribute combination
the op raises `Unsupported` naming it, and recovery is skipped with that reason. Nothing here has to
be trusted blindly: `TorchGraph.verify` compares the view with onnxruntime before any training.
A new op is one `@op` function here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from onnx import NodeProto, TensorProto, helper, numpy_helper
from torch import Tensor

Outputs = Tensor | Sequence[Tensor | None]
OpFn = Callable[["Node", list[Tensor | None]], Outputs]
OPS: dict[str, OpFn] = {}

DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16, TensorProto.INT32: torch.int32, TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}


class Unsupported(Exception):
    """The view cannot run this node exactly (an op or attribute combination it does not implement)."""


@dataclass(frozen=True)
class Node:
    """What an op implementation may read of its node."""

    name: str
    op_type: str
    attrs: dict[str, Any]
    opset: int
    n_outputs: int

    @classmethod
    def of(cls, node: NodeProto, opset: int) -> Node:
        attrs = {a.name: _attr(a) for a in node.attribute}
        return cls(node.name, node.op_type, attrs, opset, len(node.output))

    def get(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def unsupported(self, what: str) -> Unsupported:
        return Unsupported(f"{self.op_type} node '{self.name}': {what}")


def _attr(a: Any) -> Any:
    value = helper.get_attribute_value(a)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, TensorProto):
        return torch.from_numpy(numpy_helper.to_array(value).copy())
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


def op(*names: str) -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        for name in names:
            OPS[name] = fn
        return fn

    return register


def ints(t: Tensor | None) -> list[int]:
    """A shape-like tensor (Reshape's shape, Slice's starts, ...) as Python ints."""
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _req(t: Tensor | None) -> Tensor:
    if t is None:
        raise Unsupported("a required input is missing")
    return t


# ------------------------------------------------------------------------------------------ elementwise

_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Exp": torch.exp,
    "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign, "Sin": torch.sin,
    "Cos": torch.cos, "Softplus": F.softplus, "Softsign": F.softsign, "Not": torch.logical_not,
    "IsNaN": torch.isnan, "Mish": F.mish,
}


@op(*_UNARY)
def _unary(node: Node, x: list[Tensor | None]) -> Outputs:
    return _UNARY[node.op_type](_req(x[0]))


@op("Identity")
def _identity(node: Node, x: list[Tensor | None]) -> Outputs:
    return _req(x[0])


@op("Dropout")
def _dropout(node: Node, x: list[Tensor | None]) -> Outputs:
    """Inference semantics (the view runs the model as deployed); the mask output is all true."""
    data = _req(x[0])
    return [data, torch.ones_like(data, dtype=torch.bool)][: node.n_outputs]


def _divide(a: Tensor, b: Tensor) -> Tensor:
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # C-style integer division, as onnxruntime does


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _divide,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}


@op(*_BINARY)
def _binary(node: Node, x: list[Tensor | None]) -> Outputs:
    return _BINARY[node.op_type](_req(x[0]), _req(x[1]))


@op("Pow")
def _pow(node: Node, x: list[Tensor | None]) -> Outputs:
    base, exponent = _req(x[0]), _req(x[1])
    return torch.pow(base, exponent.to(base.dtype) if base.dtype.is_floating_point else exponent).to(base.dtype)


@op("Mod")
def _mod(node: Node, x: list[Tensor | None]) -> Outputs:
    a, b = _req(x[0]), _req(x[1])
    return torch.fmod(a, b) if node.get("fmod", 0) else torch.remainder(a, b)


@op("Max", "Min", "Sum", "Mean")
def _variadic(node: Node, x: list[Tensor | None]) -> Outputs:
    items = [_req(t) for t in x]
    out = items[0]
    for t in items[1:]:
        out = {"Max": torch.maximum, "Min": torch.minimum}.get(node.op_type, torch.add)(out, t)
    return out / len(items) if node.op_type == "Mean" else out


@op("Where")
def _where(node: Node, x: list[Tensor | None]) -> Outputs:
    return torch.where(_req(x[0]), _req(x[1]), _req(x[2]))


@op("Clip")
def _clip(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    if node.opset < 11:
        lo, hi = node.get("min", -math.inf), node.get("max", math.inf)
        return torch.clamp(data, lo, hi)
    lo_t = x[1] if len(x) > 1 else None
    hi_t = x[2] if len(x) > 2 else None
    return torch.clamp(data, lo_t, hi_t)


@op("LeakyRelu")
def _leaky(node: Node, x: list[Tensor | None]) -> Outputs:
    return F.leaky_relu(_req(x[0]), node.get("alpha", 0.01))


@op("Elu")
def _elu(node: Node, x: list[Tensor | None]) -> Outputs:
    return F.elu(_req(x[0]), node.get("alpha", 1.0))


@op("Celu")
def _celu(node: Node, x: list[Tensor | None]) -> Outputs:
    return F.celu(_req(x[0]), node.get("alpha", 1.0))


@op("Selu")
def _selu(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    alpha, gamma = node.get("alpha", 1.67326319217681884765625), node.get("gamma", 1.05070102214813232421875)
    return gamma * torch.where(data > 0, data, alpha * (torch.exp(data) - 1))


@op("HardSigmoid")
def _hard_sigmoid(node: Node, x: list[Tensor | None]) -> Outputs:
    return torch.clamp(node.get("alpha", 0.2) * _req(x[0]) + node.get("beta", 0.5), 0.0, 1.0)


@op("HardSwish")
def _hard_swish(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    return data * torch.clamp(data / 6.0 + 0.5, 0.0, 1.0)


@op("Gelu")
def _gelu(node: Node, x: list[Tensor | None]) -> Outputs:
    return F.gelu(_req(x[0]), approximate=node.get("approximate", "none"))


@op("PRelu")
def _prelu(node: Node, x: list[Tensor | None]) -> Outputs:
    data, slope = _req(x[0]), _req(x[1])
    return torch.where(data >= 0, data, data * slope)


@op("ThresholdedRelu")
def _thresholded(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    return torch.where(data > node.get("alpha", 1.0), data, torch.zeros_like(data))


@op("Cast")
def _cast(node: Node, x: list[Tensor | None]) -> Outputs:
    to = node.get("to")
    if to not in DTYPES:
        raise node.unsupported(f"cast to {TensorProto.DataType.Name(to)}")
    return _req(x[0]).to(DTYPES[to])


@op("CastLike")
def _cast_like(node: Node, x: list[Tensor | None]) -> Outputs:
    return _req(x[0]).to(_req(x[1]).dtype)


# ------------------------------------------------------------------------------------------ linear


def _pads(node: Node, x: Tensor, kernel: Sequence[int], strides: Sequence[int],
          dilations: Sequence[int]) -> list[int]:
    """ONNX pads [b1..bd, e1..ed] with auto_pad resolved against the input's spatial size."""
    d = len(kernel)
    mode = node.get("auto_pad", "NOTSET")
    if mode == "VALID":
        return [0] * (2 * d)
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, dil in zip(x.shape[2:], kernel, strides, dilations, strict=True):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * dil + 1 - size)
            small = total // 2
            begin.append(small if mode == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return begin + end
    return list(node.get("pads", [0] * (2 * d)))


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX [b1..bd, e1..ed] -> F.pad's (b_d, e_d, ..., b_1, e_1)."""
    d = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(d)):
        out += [pads[i], pads[i + d]]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@op("Conv")
def _conv(node: Node, x: list[Tensor | None]) -> Outputs:
    data, weight = _req(x[0]), _req(x[1])
    bias = x[2] if len(x) > 2 else None
    d = weight.ndim - 2
    if d not in _CONV:
        raise node.unsupported(f"{d}-D convolution")
    kernel = list(weight.shape[2:])
    strides, dilations = node.get("strides", [1] * d), node.get("dilations", [1] * d)
    pads = _pads(node, data, kernel, strides, dilations)
    if pads[:d] == pads[d:]:
        return _CONV[d](data, weight, bias, strides, pads[:d], dilations, node.get("group", 1))
    return _CONV[d](F.pad(data, _torch_pad(pads)), weight, bias, strides, 0, dilations, node.get("group", 1))


@op("ConvTranspose")
def _conv_transpose(node: Node, x: list[Tensor | None]) -> Outputs:
    """Computed uncropped (padding 0), then cropped by the ONNX pads and widened by output_padding,
    which covers asymmetric and auto pads and an explicit output_shape."""
    data, weight = _req(x[0]), _req(x[1])
    bias = x[2] if len(x) > 2 else None
    d = weight.ndim - 2
    if d not in _CONV_T:
        raise node.unsupported(f"{d}-D transposed convolution")
    group = node.get("group", 1)
    kernel = list(weight.shape[2:])
    strides, dilations = node.get("strides", [1] * d), node.get("dilations", [1] * d)
    extra = list(node.get("output_padding", [0] * d))
    full = [(i - 1) * s + (k - 1) * dl + 1 for i, s, k, dl in zip(data.shape[2:], strides, kernel, dilations,
                                                                 strict=True)]
    mode = node.get("auto_pad", "NOTSET")
    wanted = node.get("output_shape")
    if wanted is None and mode in ("SAME_UPPER", "SAME_LOWER"):
        wanted = [i * s for i, s in zip(data.shape[2:], strides, strict=True)]
    if wanted is not None:
        wanted = list(wanted)[-d:]
        totals = [f + e - w for f, e, w in zip(full, extra, wanted, strict=True)]
        upper = mode == "SAME_UPPER"
        begin = [t // 2 if upper else t - t // 2 for t in totals]
        pads = begin + [t - b for t, b in zip(totals, begin, strict=True)]
    else:
        pads = [0] * (2 * d) if mode == "VALID" else list(node.get("pads", [0] * (2 * d)))
    y = _CONV_T[d](data, weight, None, strides, 0, 0, group, dilations)
    if any(extra):
        y = F.pad(y, _torch_pad([0] * d + extra))
    index = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[d + i]) for i in range(d)]
    y = y[tuple(index)]
    if bias is not None:
        y = y + bias.reshape(1, -1, *([1] * d))
    return y


@op("Gemm")
def _gemm(node: Node, x: list[Tensor | None]) -> Outputs:
    a, b = _req(x[0]), _req(x[1])
    c = x[2] if len(x) > 2 else None
    if node.get("transA", 0):
        a = a.transpose(0, 1)
    if node.get("transB", 0):
        b = b.transpose(0, 1)
    y = node.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + node.get("beta", 1.0) * c


@op("MatMul")
def _matmul(node: Node, x: list[Tensor | None]) -> Outputs:
    return torch.matmul(_req(x[0]), _req(x[1]))


@op("Einsum")
def _einsum(node: Node, x: list[Tensor | None]) -> Outputs:
    return torch.einsum(node.get("equation"), *[_req(t) for t in x])


# ------------------------------------------------------------------------------------------ indexing


@op("Gather")
def _gather(node: Node, x: list[Tensor | None]) -> Outputs:
    data, idx = _req(x[0]), _req(x[1]).to(torch.int64)
    axis = _axis(node.get("axis", 0), data.ndim)
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1:]))


@op("GatherElements")
def _gather_elements(node: Node, x: list[Tensor | None]) -> Outputs:
    data, idx = _req(x[0]), _req(x[1]).to(torch.int64)
    axis = _axis(node.get("axis", 0), data.ndim)
    return torch.gather(data, axis, torch.where(idx < 0, idx + data.shape[axis], idx))


@op("GatherND")
def _gather_nd(node: Node, x: list[Tensor | None]) -> Outputs:
    data, idx = _req(x[0]), _req(x[1]).to(torch.int64)
    b = node.get("batch_dims", 0)
    k = idx.shape[-1]
    batch = math.prod(data.shape[:b])
    flat = data.reshape(batch, *data.shape[b:])
    coords = idx.reshape(batch, -1, k)
    dims = torch.tensor(data.shape[b:b + k], dtype=torch.int64)
    coords = torch.where(coords < 0, coords + dims, coords)
    rows = torch.arange(batch).reshape(batch, 1).expand(batch, coords.shape[1])
    out = flat[(rows, *coords.unbind(-1))]
    return out.reshape((*data.shape[:b], *idx.shape[b:-1], *data.shape[b + k:]))


@op("Slice")
def _slice(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    if node.opset < 10:
        starts, ends = list(node.get("starts")), list(node.get("ends"))
        axes = list(node.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = ints(x[1]), ints(x[2])
        axes = ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    out = data
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, data.ndim)
        size = data.shape[axis]
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
            index = [slice(None)] * data.ndim
            index[axis] = slice(start, end, step)
            out = out[tuple(index)]
        else:
            start, end = min(max(start, -1), size - 1), min(max(end, -1), size - 1)
            out = out.index_select(axis, torch.arange(start, end, step, dtype=torch.int64))
    return out


@op("Split")
def _split(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    axis = _axis(node.get("axis", 0), data.ndim)
    sizes = list(node.get("split", [])) if node.opset < 13 else (ints(x[1]) if len(x) > 1 else [])
    if not sizes:
        size = data.shape[axis]
        chunk = -(-size // node.n_outputs)
        sizes = [min(chunk, size - i * chunk) for i in range(node.n_outputs)]
    return list(torch.split(data, sizes, dim=axis))


@op("Concat")
def _concat(node: Node, x: list[Tensor | None]) -> Outputs:
    items = [_req(t) for t in x]
    axis = _axis(node.get("axis"), max(t.ndim for t in items))
    return torch.cat([t for t in items if t.numel() or t.ndim > 1], dim=axis) if len(items) > 1 else items[0]


@op("Trilu")
def _trilu(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    k = ints(x[1])[0] if len(x) > 1 and x[1] is not None else 0
    return torch.triu(data, k) if node.get("upper", 1) else torch.tril(data, k)


# ------------------------------------------------------------------------------------------ layout


@op("Reshape")
def _reshape(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    shape = list(node.get("shape")) if node.opset < 5 else ints(x[1])
    if not node.get("allowzero", 0):
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


@op("Flatten")
def _flatten(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    axis = _axis(node.get("axis", 1), data.ndim)
    return data.reshape(math.prod(data.shape[:axis]), -1)


@op("Transpose")
def _transpose(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    return data.permute(*node.get("perm", list(reversed(range(data.ndim)))))


@op("Squeeze")
def _squeeze(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    axes = node.get("axes") if node.opset < 13 else (ints(x[1]) if len(x) > 1 and x[1] is not None else None)
    if not axes:
        return data.squeeze()
    return data.squeeze(tuple(_axis(a, data.ndim) for a in axes))


@op("Unsqueeze")
def _unsqueeze(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    axes = list(node.get("axes")) if node.opset < 13 else ints(x[1])
    rank = data.ndim + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        data = data.unsqueeze(a)
    return data


@op("Expand")
def _expand(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    return data.expand(torch.broadcast_shapes(tuple(data.shape), tuple(ints(x[1]))))


@op("Tile")
def _tile(node: Node, x: list[Tensor | None]) -> Outputs:
    return _req(x[0]).repeat(*ints(x[1]))


@op("Shape")
def _shape(node: Node, x: list[Tensor | None]) -> Outputs:
    dims = list(_req(x[0]).shape)
    rank = len(dims)
    start = node.get("start", 0)
    end = node.get("end", rank)
    start, end = (min(max(_axis(v, rank), 0), rank) for v in (start, end))
    return torch.tensor(dims[start:end], dtype=torch.int64)


@op("Size")
def _size(node: Node, x: list[Tensor | None]) -> Outputs:
    return torch.tensor(_req(x[0]).numel(), dtype=torch.int64)


@op("Constant")
def _constant(node: Node, x: list[Tensor | None]) -> Outputs:
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in node.attrs:
            return torch.tensor(node.attrs[key], dtype=dtype)
    value = node.get("value")
    if not isinstance(value, Tensor):
        raise node.unsupported("a Constant that is not a dense tensor")
    return value


@op("ConstantOfShape")
def _constant_of_shape(node: Node, x: list[Tensor | None]) -> Outputs:
    value = node.get("value")
    fill = value.reshape(-1)[0] if isinstance(value, Tensor) else torch.tensor(0.0)
    return torch.full(ints(x[0]), fill.item(), dtype=fill.dtype)


@op("Range")
def _range(node: Node, x: list[Tensor | None]) -> Outputs:
    start, limit, delta = _req(x[0]), _req(x[1]), _req(x[2])
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@op("DepthToSpace")
def _depth_to_space(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    b = node.get("blocksize")
    n, c, h, w = data.shape
    if node.get("mode", "DCR") == "DCR":
        y = data.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = data.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@op("SpaceToDepth")
def _space_to_depth(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    b = node.get("blocksize")
    n, c, h, w = data.shape
    y = data.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@op("Pad")
def _pad(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    if node.opset < 11:
        pads, value = list(node.get("pads")), node.get("value", 0.0)
    else:
        pads = ints(x[1])
        value = x[2].item() if len(x) > 2 and x[2] is not None and x[2].numel() else 0.0
        if len(x) > 3 and x[3] is not None:
            axes = [_axis(a, data.ndim) for a in ints(x[3])]
            full = [0] * (2 * data.ndim)
            for i, a in enumerate(axes):
                full[a], full[a + data.ndim] = pads[i], pads[i + len(axes)]
            pads = full
    mode = node.get("mode", "constant")
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    if mode not in modes:
        raise node.unsupported(f"mode {mode!r}")
    if mode == "constant":
        return F.pad(data, _torch_pad(pads), value=value)
    r = data.ndim
    first = next((i for i in range(r) if pads[i] or pads[i + r]), r)
    if first == r:
        return data
    if first == 0 or r - first > 3:
        raise node.unsupported(f"{mode} padding of more than the last three axes")
    inner = data.reshape(-1, *data.shape[first:])  # torch pads the trailing axes of a (batch, ...) tensor
    out = F.pad(inner, _torch_pad(pads[first:r] + pads[r + first:]), mode=modes[mode])
    return out.reshape(*data.shape[:first], *out.shape[1:])


@op("Resize", "Upsample")
def _resize(node: Node, x: list[Tensor | None]) -> Outputs:
    """The mode / coordinate-transformation combinations torch's interpolate computes exactly."""
    data = _req(x[0])
    d = data.ndim - 2
    if node.op_type == "Upsample" or node.opset < 11:
        scales_t = x[1] if len(x) > 1 else None
        scales = list(node.get("scales")) if scales_t is None else [float(v) for v in scales_t.tolist()]
        sizes: list[int] = []
        transform = "asymmetric"
    else:
        scales = [float(v) for v in x[2].tolist()] if len(x) > 2 and x[2] is not None and x[2].numel() else []
        sizes = ints(x[3]) if len(x) > 3 and x[3] is not None else []
        transform = node.get("coordinate_transformation_mode", "half_pixel")
    if (scales and scales[:2] != [1.0, 1.0]) or (sizes and sizes[:2] != list(data.shape[:2])):
        raise node.unsupported("resizing the batch or channel axis")
    if node.get("antialias", 0) or node.get("exclude_outside", 0) or node.get("axes") is not None:
        raise node.unsupported("antialias / exclude_outside / axes")
    mode = node.get("mode", "nearest")
    kwargs: dict[str, Any] = ({"size": sizes[2:]} if sizes else
                              {"scale_factor": scales[2:], "recompute_scale_factor": False})
    if mode == "nearest":
        nearest = node.get("nearest_mode", "round_prefer_floor")
        if transform == "asymmetric" and (nearest == "floor" or node.opset < 11):
            return F.interpolate(data, mode="nearest", **kwargs)
        if transform in ("half_pixel", "pytorch_half_pixel") and nearest in ("round_prefer_ceil",
                                                                             "round_prefer_floor"):
            return F.interpolate(data, mode="nearest-exact", **kwargs)
        raise node.unsupported(f"nearest mode {nearest!r} with {transform!r} coordinates")
    name = {"linear": {1: "linear", 2: "bilinear", 3: "trilinear"}.get(d), "cubic": "bicubic" if d == 2 else None}
    torch_mode = name.get(mode)
    if torch_mode is None or transform not in ("align_corners", "half_pixel", "pytorch_half_pixel"):
        raise node.unsupported(f"mode {mode!r} with {transform!r} coordinates")
    if mode == "cubic" and node.get("cubic_coeff_a", -0.75) != -0.75:
        raise node.unsupported("cubic_coeff_a other than -0.75")
    return F.interpolate(data, mode=torch_mode, align_corners=transform == "align_corners", **kwargs)


# ------------------------------------------------------------------------------------------ pooling


def _pool_geometry(node: Node, data: Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(node.get("kernel_shape"))
    d = len(kernel)
    strides, dilations = list(node.get("strides", [1] * d)), list(node.get("dilations", [1] * d))
    return kernel, strides, dilations, _pads(node, data, kernel, strides, dilations)


@op("MaxPool")
def _max_pool(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    if node.n_outputs > 1:
        raise node.unsupported("the Indices output")
    kernel, strides, dilations, pads = _pool_geometry(node, data)
    d = len(kernel)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[d]
    ceil = bool(node.get("ceil_mode", 0))
    if pads[:d] == pads[d:] and all(p <= k // 2 for p, k in zip(pads[:d], kernel, strict=True)):
        return pool(data, kernel, strides, pads[:d], dilations, ceil_mode=ceil)
    padded = F.pad(data, _torch_pad(pads), value=-math.inf)
    return pool(padded, kernel, strides, 0, dilations, ceil_mode=ceil)


@op("AveragePool")
def _avg_pool(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    kernel, strides, dilations, pads = _pool_geometry(node, data)
    d = len(kernel)
    if any(v != 1 for v in dilations):
        raise node.unsupported("dilated average pooling")
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[d]
    ceil = bool(node.get("ceil_mode", 0))
    include = bool(node.get("count_include_pad", 0))
    if pads[:d] == pads[d:] and all(p <= k // 2 for p, k in zip(pads[:d], kernel, strict=True)):
        return pool(data, kernel, strides, pads[:d], ceil_mode=ceil, count_include_pad=include)
    padded = F.pad(data, _torch_pad(pads))
    total = pool(padded, kernel, strides, 0, ceil_mode=ceil)
    if include:
        return total
    ones = F.pad(torch.ones_like(data[:1, :1]), _torch_pad(pads))
    return total / pool(ones, kernel, strides, 0, ceil_mode=ceil)


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    dims = tuple(range(2, data.ndim))
    return data.mean(dims, keepdim=True) if node.op_type == "GlobalAveragePool" else data.amax(dims, keepdim=True)


# ------------------------------------------------------------------------------------------ normalization


def _channel(t: Tensor, rank: int) -> Tensor:
    return t.reshape(1, -1, *([1] * (rank - 2)))


@op("BatchNormalization")
def _batch_norm(node: Node, x: list[Tensor | None]) -> Outputs:
    """Inference form (running statistics), as the deployed model computes it."""
    data, scale, bias, mean, var = (_req(t) for t in x[:5])
    if node.get("training_mode", 0):
        raise node.unsupported("training_mode=1")
    r = data.ndim
    inv = torch.rsqrt(_channel(var, r) + node.get("epsilon", 1e-5))
    return (data - _channel(mean, r)) * inv * _channel(scale, r) + _channel(bias, r)


@op("InstanceNormalization")
def _instance_norm(node: Node, x: list[Tensor | None]) -> Outputs:
    return F.instance_norm(_req(x[0]), weight=_req(x[1]), bias=_req(x[2]), eps=node.get("epsilon", 1e-5))


@op("LayerNormalization")
def _layer_norm(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    axis = _axis(node.get("axis", -1), data.ndim)
    dims = tuple(range(axis, data.ndim))
    mean = data.mean(dims, keepdim=True)
    centred = data - mean
    inv = torch.rsqrt((centred * centred).mean(dims, keepdim=True) + node.get("epsilon", 1e-5))
    y = centred * inv * _req(x[1])
    if len(x) > 2 and x[2] is not None:
        y = y + x[2]
    return [y, mean, inv][: node.n_outputs]


@op("GroupNormalization")
def _group_norm(node: Node, x: list[Tensor | None]) -> Outputs:
    """Opset 18 scales per group, opset 21 per channel: the scale's length says which."""
    data, scale, bias = _req(x[0]), _req(x[1]), _req(x[2])
    groups = node.get("num_groups")
    n, c = data.shape[:2]
    flat = data.reshape(n, groups, -1)
    mean = flat.mean(-1, keepdim=True)
    var = ((flat - mean) ** 2).mean(-1, keepdim=True)
    y = ((flat - mean) * torch.rsqrt(var + node.get("epsilon", 1e-5))).reshape(data.shape)
    if scale.numel() != c:
        scale, bias = scale.repeat_interleave(c // groups), bias.repeat_interleave(c // groups)
    return y * _channel(scale, data.ndim) + _channel(bias, data.ndim)


@op("LpNormalization")
def _lp_norm(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    return F.normalize(data, p=node.get("p", 2), dim=node.get("axis", -1), eps=0.0)


# ------------------------------------------------------------------------------------------ reductions

_REDUCE: dict[str, Callable[[Tensor, tuple[int, ...], bool], Tensor]] = {
    "ReduceMean": lambda t, d, k: t.mean(d, keepdim=k),
    "ReduceSum": lambda t, d, k: t.sum(d, keepdim=k),
    "ReduceMax": lambda t, d, k: t.amax(d, keepdim=k),
    "ReduceMin": lambda t, d, k: t.amin(d, keepdim=k),
    "ReduceProd": lambda t, d, k: _prod(t, d, k),
    "ReduceL1": lambda t, d, k: t.abs().sum(d, keepdim=k),
    "ReduceL2": lambda t, d, k: (t * t).sum(d, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda t, d, k: (t * t).sum(d, keepdim=k),
    "ReduceLogSum": lambda t, d, k: t.sum(d, keepdim=k).log(),
    "ReduceLogSumExp": lambda t, d, k: t.logsumexp(d, keepdim=k),
}


def _prod(t: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        t = t.prod(d, keepdim=keep)
    return t


@op(*_REDUCE)
def _reduce(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    axes_in_attr = node.opset < (13 if node.op_type == "ReduceSum" else 18)
    axes = node.get("axes") if axes_in_attr else (ints(x[1]) if len(x) > 1 and x[1] is not None else None)
    if not axes:
        if node.get("noop_with_empty_axes", 0):
            return data
        axes = list(range(data.ndim))
    dims = tuple(_axis(a, data.ndim) for a in axes)
    return _REDUCE[node.op_type](data, dims, bool(node.get("keepdims", 1)))


@op("ArgMax", "ArgMin")
def _arg(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    axis = _axis(node.get("axis", 0), data.ndim)
    keep = bool(node.get("keepdims", 1))
    last = bool(node.get("select_last_index", 0))
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    if not last:
        return fn(data, axis, keepdim=keep)
    flipped = fn(data.flip(axis), axis, keepdim=keep)
    return data.shape[axis] - 1 - flipped


@op("Softmax", "LogSoftmax", "Hardmax")
def _softmax(node: Node, x: list[Tensor | None]) -> Outputs:
    """Opset 13 normalizes along one axis; before it the input is coerced to 2-D at `axis`."""
    data = _req(x[0])
    if node.opset >= 13:
        axis = _axis(node.get("axis", -1), data.ndim)
        flat, shape = data, None
    else:
        axis = _axis(node.get("axis", 1), data.ndim)
        shape = data.shape
        flat, axis = data.reshape(math.prod(data.shape[:axis]), -1), 1
    if node.op_type == "Softmax":
        y = torch.softmax(flat, axis)
    elif node.op_type == "LogSoftmax":
        y = torch.log_softmax(flat, axis)
    else:
        y = F.one_hot(flat.argmax(axis), flat.shape[axis]).to(flat.dtype).movedim(-1, axis)
    return y if shape is None else y.reshape(shape)


@op("CumSum")
def _cumsum(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    axis = _axis(ints(x[1])[0], data.ndim)
    if node.get("reverse", 0):
        data = data.flip(axis)
    y = data.cumsum(axis)
    if node.get("exclusive", 0):
        y = y - data
    return y.flip(axis) if node.get("reverse", 0) else y


@op("TopK")
def _topk(node: Node, x: list[Tensor | None]) -> Outputs:
    data = _req(x[0])
    k = ints(x[1])[0] if node.opset >= 10 else node.get("k")
    values, indices = torch.topk(data, k, dim=node.get("axis", -1), largest=bool(node.get("largest", 1)),
                                 sorted=bool(node.get("sorted", 1)))
    return [values, indices]
