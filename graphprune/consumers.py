"""Weight consumers of removed channels, seen as linear maps y = W·x (+ b) over input columns.

A Conv's columns are its im2col patches (input channel-major, then kernel offsets), a Gemm/MatMul's
columns its input features (Flatten blocks included, since labels are per position). Everything
OBS needs from the graph is here; the math stays in obs.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray
from onnx import NodeProto

from graphprune.depgraph import DependencyGraph
from graphprune.onnxutil import attr, node_name


@dataclass
class LinearView:
    node: str
    op: str
    x: str  # activation input
    x_axis: int  # its consumed (channel) axis
    weight: str
    bias: str | None
    keep: NDArray[np.bool_]  # per input channel position
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    trans_b: bool = False

    @property
    def block(self) -> int:
        """Columns per input channel position (kernel area for a Conv)."""
        return math.prod(self.kernel) if self.op == "Conv" else 1

    def removed_columns(self) -> NDArray[np.int64]:
        gone = np.nonzero(~self.keep)[0]
        return (gone[:, None] * self.block + np.arange(self.block)[None, :]).reshape(-1)

    def matrix(self, w: NDArray[Any]) -> NDArray[np.float64]:
        """W as [out, columns]."""
        w = np.asarray(w, dtype=np.float64)
        if self.op == "Conv":
            return w.reshape(w.shape[0], -1)
        return w if self.trans_b else w.T

    def unmatrix(self, m: NDArray[np.float64], like: NDArray[Any]) -> NDArray[Any]:
        if self.op == "Conv":
            return m.reshape(like.shape).astype(like.dtype)
        return (m if self.trans_b else m.T).astype(like.dtype)

    def columns(self, x: NDArray[Any]) -> NDArray[np.float64]:
        """Rows of input columns seen by the layer (im2col for Conv)."""
        x = np.asarray(x, dtype=np.float64)
        if self.op == "Conv":
            return _im2col(x, self.kernel, self.strides, self.pads, self.dilations)
        return np.moveaxis(x, self.x_axis, -1).reshape(-1, x.shape[self.x_axis])


def _im2col(x: NDArray[np.float64], kernel: tuple[int, ...], strides: tuple[int, ...],
            pads: tuple[int, ...], dilations: tuple[int, ...]) -> NDArray[np.float64]:
    nd = len(kernel)
    pad_width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
    xp = np.pad(x, pad_width)
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True))
    win = sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    index = (slice(None), slice(None), *[slice(None, None, s) for s in strides],
             *[slice(None, None, d) for d in dilations])
    win = win[index]  # [N, C, *out, *kernel]
    c = win.shape[1]
    order = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return win.transpose(order).reshape(-1, c * math.prod(kernel))


def _conv_pads(node: NodeProto, in_spatial: tuple[int, ...], kernel: tuple[int, ...],
               strides: tuple[int, ...], dilations: tuple[int, ...]) -> tuple[int, ...]:
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    nd = len(kernel)
    if auto in ("NOTSET", ""):
        return tuple(int(p) for p in attr(node, "pads", [0] * 2 * nd))
    if auto == "VALID":
        return (0,) * 2 * nd
    begin, end = [], []
    for size, k, s, d in zip(in_spatial, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(big if auto == "SAME_LOWER" else small)
        end.append(small if auto == "SAME_LOWER" else big)
    return tuple(begin + end)


def _bias_after(g: DependencyGraph, out: str) -> str | None:
    """The constant of an `Add(out, bias)` right after a MatMul (a Linear on 3-D inputs)."""
    users = g.users.get(out, [])
    if len(users) == 1 and users[0].op_type == "Add":
        other = [i for i in users[0].input if i != out]
        if len(other) == 1 and g.is_const(other[0]) and g.const(other[0]).ndim == 1:
            return other[0]
    return None


def _view(g: DependencyGraph, node: NodeProto, keep: NDArray[np.bool_]) -> LinearView | None:
    """`node` as a linear map of its first input, if it is one OBS can correct."""
    x = node.input[0]
    if len(node.input) < 2 or not g.is_const(node.input[1]) or g.is_const(x):
        return None
    w = node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Conv" and int(attr(node, "group", 1)) == 1:
        kernel = tuple(g.shape(w)[2:])
        nd = len(kernel)
        strides = tuple(int(s) for s in attr(node, "strides", [1] * nd))
        dilations = tuple(int(d) for d in attr(node, "dilations", [1] * nd))
        pads = _conv_pads(node, g.shape(x)[2:], kernel, strides, dilations)
        return LinearView(node_name(node), "Conv", x, 1, w, bias, keep, kernel, strides, pads, dilations)
    if node.op_type == "Gemm" and not int(attr(node, "transA", 0)) and g.rank(x) == 2:
        if bias is not None and (not g.is_const(bias) or g.const(bias).ndim != 1):
            bias = None
        return LinearView(node_name(node), "Gemm", x, 1, w, bias, keep, trans_b=bool(attr(node, "transB", 0)))
    if node.op_type == "MatMul" and g.rank(w) == 2 and g.rank(x) >= 2:
        return LinearView(node_name(node), "MatMul", x, g.rank(x) - 1, w, _bias_after(g, node.output[0]), keep)
    return None


def linear_views(g: DependencyGraph, removed: NDArray[np.bool_]) -> list[LinearView]:
    """Conv (group 1) / Gemm / MatMul-with-constant layers that lose input channels."""
    nodes = {node_name(n): n for n in g.model.graph.node}
    losing: dict[str, NDArray[np.bool_]] = {}
    for c in g.consumes:
        keep = ~removed[g.tracked(c.tensor)[c.axis]]
        if c.index == 0 and not keep.all():
            losing[c.node] = keep
    views = [_view(g, nodes[n], keep) for n, keep in losing.items()]
    return [v for v in views if v is not None]
