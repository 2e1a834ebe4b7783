"""Weight consumers of removed channels, seen as linear maps y = W·x (+ b) over input columns.

A Conv's columns are its im2col patches (input channel-major, then kernel offsets), a Gemm/MatMul's
columns its input features (Flatten blocks included, since labels are per position). A ConvTranspose
is the Conv it equals: stride 1 over its input with stride-1 zeros between pixels, padded by
dilation·(k−1) − pad, kernel flipped and its in/out axes swapped; so OBS and its statistics need
nothing of their own. Its H is always held exact: the zeros make tap moments depend on each output
position's phase, which a Kronecker factoring averages away (measured on a stride-2 3x3 decoder: the
factored H still halved the layer's true error, but its error estimates were off by 30x). Everything
OBS needs from the graph is here; the math stays in obs.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import NodeProto

from graphprune.depgraph import DependencyGraph
from graphprune.onnxutil import attr, node_name

MAX_TRANSPOSED_COLUMNS = 4608  # a ConvTranspose's exact H: 512 channels x 3x3 taps is 170 MB in float64


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
    kron: bool = False  # its moments are held Kronecker-factored, channels ⊗ kernel taps (obs.Kron)
    upsample: tuple[int, ...] = ()  # a ConvTranspose's strides: zeros go between its input's pixels

    @property
    def convolutional(self) -> bool:
        return self.op in ("Conv", "ConvTranspose")

    @property
    def block(self) -> int:
        """Columns per input channel position (kernel area for a Conv)."""
        return math.prod(self.kernel) if self.convolutional else 1

    def removed_columns(self) -> NDArray[np.int64]:
        return self.columns_of(np.nonzero(~self.keep)[0])

    def columns_of(self, positions: NDArray[np.int64]) -> NDArray[np.int64]:
        """The weight-matrix columns that read these input channel positions."""
        positions = np.asarray(positions, dtype=np.int64)
        return (positions[:, None] * self.block + np.arange(self.block)[None, :]).reshape(-1)

    def matrix(self, w: NDArray[Any]) -> NDArray[np.float64]:
        """W as [out, columns]."""
        w = np.asarray(w, dtype=np.float64)
        if self.op == "ConvTranspose":
            w = self._swapped(w)
        if self.convolutional:
            return w.reshape(w.shape[0], -1)
        return w if self.trans_b else w.T

    def unmatrix(self, m: NDArray[np.float64], like: NDArray[Any]) -> NDArray[Any]:
        if self.op == "ConvTranspose":
            return self._swapped(m.reshape(like.shape[1], like.shape[0], *like.shape[2:])).astype(like.dtype)
        if self.op == "Conv":
            return m.reshape(like.shape).astype(like.dtype)
        return (m if self.trans_b else m.T).astype(like.dtype)

    @staticmethod
    def _swapped(w: NDArray[Any]) -> NDArray[Any]:
        """ConvTranspose weights [in, out, *k] <-> those of the Conv it equals, [out, in, *k] flipped
        (the map is its own inverse)."""
        return np.flip(np.swapaxes(w, 0, 1), axis=tuple(range(2, w.ndim)))

    def conv_input(self, x: NDArray[Any]) -> NDArray[Any]:
        """What the (equivalent) Conv reads: a ConvTranspose's input with zeros between its pixels."""
        if not self.upsample:
            return x
        n, c, *spatial = x.shape
        out = np.zeros((n, c, *[(d - 1) * s + 1 for d, s in zip(spatial, self.upsample, strict=True)]),
                       dtype=x.dtype)
        out[(slice(None), slice(None), *[slice(None, None, s) for s in self.upsample])] = x
        return out

    def columns(self, x: NDArray[Any], max_rows: int, rng: np.random.Generator,
                taps_first: bool = False) -> NDArray[np.float32]:
        """Up to `max_rows` random rows of the input columns the layer sees (im2col patches for a
        Conv, gathered only at the sampled positions: the full im2col of a large feature map would
        cost gigabytes). float32: the activations are, and their Gram matrix is the hot spot.
        `taps_first`: a Conv's patches as [rows, taps, C] (what a Kronecker-factored H reads)."""
        x = np.asarray(x)
        if not self.convolutional:
            rows = np.moveaxis(x, self.x_axis, -1).reshape(-1, x.shape[self.x_axis])
            if rows.shape[0] > max_rows:
                rows = rows[rng.choice(rows.shape[0], max_rows, replace=False)]
            return rows.astype(np.float32)
        return sampled_patches(self.conv_input(x), self.kernel, self.strides, self.pads, self.dilations, max_rows,
                               rng, taps_first)


def sampled_patches(x: NDArray[Any], kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...],
                    dilations: tuple[int, ...], max_rows: int, rng: np.random.Generator,
                    taps_first: bool = False) -> NDArray[np.float32]:
    """im2col rows (channel-major, then kernel offsets) at up to `max_rows` random output positions;
    with `taps_first`, [rows, taps, C] (the gather's own layout, no transposing copy)."""
    nd = len(kernel)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]) if any(pads) else x
    out = [(xp.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(nd)]
    total = x.shape[0] * math.prod(out)
    pick = rng.choice(total, max_rows, replace=False) if total > max_rows else np.arange(total)
    coords = np.unravel_index(pick, (x.shape[0], *out))
    index: list[Any] = [coords[0].reshape(-1, *[1] * nd), slice(None)]
    for i in range(nd):
        offsets = np.arange(kernel[i]) * dilations[i]
        shape = [1] * nd
        shape[i] = kernel[i]
        index.append(coords[1 + i].reshape(-1, *[1] * nd) * strides[i] + offsets.reshape(shape))
    patches = xp[tuple(index)]  # [rows, *kernel, C]: the advanced indices come first
    if taps_first:
        return patches.reshape(len(pick), -1, x.shape[1]).astype(np.float32, copy=False)
    return np.moveaxis(patches, -1, 1).reshape(len(pick), -1).astype(np.float32, copy=False)


def tap_coverage(spatial: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...],
                 pads: tuple[int, ...], dilations: tuple[int, ...]) -> tuple[NDArray[np.float32], int]:
    """How many (output position, kernel tap) pairs read each input pixel, and how many pairs there
    are per sample (those reading padding included): Σ over every patch and tap of x xᵀ is
    Σ over pixels of coverage · x xᵀ, at the cost of one pass over the pixels instead of k."""
    nd = len(kernel)
    padded = [spatial[i] + pads[i] + pads[i + nd] for i in range(nd)]
    out = [(padded[i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(nd)]
    cov = np.zeros(padded, dtype=np.float32)
    for tap in np.ndindex(*kernel):
        cov[tuple(slice(tap[i] * dilations[i], tap[i] * dilations[i] + (out[i] - 1) * strides[i] + 1, strides[i])
                  for i in range(nd))] += 1
    return cov[tuple(slice(pads[i], pads[i] + spatial[i]) for i in range(nd))], math.prod(out) * math.prod(kernel)


def _auto_pad(node: NodeProto) -> str:
    auto = attr(node, "auto_pad", b"NOTSET")
    return auto.decode() if isinstance(auto, bytes) else str(auto)


def _geometry(g: DependencyGraph, node: NodeProto) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """A (transposed) convolution's kernel, strides and dilations."""
    kernel = tuple(g.shape(node.input[1])[2:])
    nd = len(kernel)
    strides = tuple(int(s) for s in attr(node, "strides", [1] * nd))
    dilations = tuple(int(d) for d in attr(node, "dilations", [1] * nd))
    return kernel, strides, dilations


def _conv_pads(node: NodeProto, in_spatial: tuple[int, ...], kernel: tuple[int, ...],
               strides: tuple[int, ...], dilations: tuple[int, ...]) -> tuple[int, ...]:
    auto = _auto_pad(node)
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
        kernel, strides, dilations = _geometry(g, node)
        pads = _conv_pads(node, g.shape(x)[2:], kernel, strides, dilations)
        return LinearView(node_name(node), "Conv", x, 1, w, bias, keep, kernel, strides, pads, dilations)
    if node.op_type == "ConvTranspose" and int(attr(node, "group", 1)) == 1:
        return _transposed_view(g, node, bias, keep)
    if node.op_type == "Gemm" and not int(attr(node, "transA", 0)) and g.rank(x) == 2:
        if bias is not None and (not g.is_const(bias) or g.const(bias).ndim != 1):
            bias = None
        return LinearView(node_name(node), "Gemm", x, 1, w, bias, keep, trans_b=bool(attr(node, "transB", 0)))
    if node.op_type == "MatMul" and g.rank(w) == 2 and g.rank(x) >= 2:
        return LinearView(node_name(node), "MatMul", x, g.rank(x) - 1, w, _bias_after(g, node.output[0]), keep)
    return None


def _transposed_view(g: DependencyGraph, node: NodeProto, bias: str | None,
                     keep: NDArray[np.bool_]) -> LinearView | None:
    """A ConvTranspose as the stride-1 Conv over its zero-upsampled input that it equals, when its
    padding is explicit, leaves that Conv a non-negative padding and its exact H is affordable (else
    OBS leaves it alone)."""
    w = node.input[1]
    kernel, strides, dilations = _geometry(g, node)
    nd = len(kernel)
    if g.shape(w)[0] * math.prod(kernel) > MAX_TRANSPOSED_COLUMNS:
        return None
    if _auto_pad(node) not in ("NOTSET", "") or attr(node, "output_shape"):
        return None
    pads = [int(p) for p in attr(node, "pads", [0] * 2 * nd)]
    extra = [int(p) for p in attr(node, "output_padding", [0] * nd)]
    reach = [(k - 1) * d for k, d in zip(kernel, dilations, strict=True)]
    conv_pads = tuple([reach[i] - pads[i] for i in range(nd)] + [reach[i] - pads[nd + i] + extra[i] for i in range(nd)])
    if min(conv_pads) < 0:
        return None
    return LinearView(node_name(node), "ConvTranspose", node.input[0], 1, w, bias, keep, kernel, (1,) * nd,
                      conv_pads, dilations, upsample=strides)


def linear_views(g: DependencyGraph, removed: NDArray[np.bool_]) -> list[LinearView]:
    """Conv/ConvTranspose (group 1) / Gemm / MatMul-with-constant layers that lose input channels."""
    nodes = {node_name(n): n for n in g.model.graph.node}
    losing: dict[str, NDArray[np.bool_]] = {}
    for c in g.consumes:
        keep = ~removed[g.tracked(c.tensor)[c.axis]]
        if c.index == 0 and not keep.all():
            losing[c.node] = keep
    views = [_view(g, nodes[n], keep) for n, keep in losing.items()]
    # a shared weight is fitted to no single use: its copies stay equal and are tied again
    shared = {name for family in g.families for name in family}
    return [v for v in views if v is not None and not {v.weight, v.bias} & shared]
