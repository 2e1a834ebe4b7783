"""Ops between a producer conv 'p' (8 channels) and a consumer conv 'q': each either passes the
channels on exactly (q's columns are p's rows, per-channel constants join the group and are sliced)
or blocks p's group with the right BlockKind.

Covers the unary and broadcasting elementwise rules, per-channel and across-channel normalizations,
reductions/softmax/TopK/CumSum/ArgMax, pooling/Resize/Pad, and the layout ops that keep the channel
axis (Transpose round trips, Squeeze/Unsqueeze, Expand, Tile, Gather, Reshape, Shape reads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from rules.helpers import Net, arrays, group_of, kept, kinds, params, pruned, sandwich, units

import graphprune
from graphprune.reasons import BlockKind

Build = Callable[[Net, str], str]
BASE = {("p.w", 0, "out"), ("p.b", 0, "bias"), ("q.w", 1, "in")}
F32 = np.float32


@dataclass
class Pass:
    build: Build
    opset: int = 17
    labelled: dict[str, tuple[int, str]] = field(default_factory=dict)  # constant -> (axis, role)
    rewritten: dict[str, list[int]] = field(default_factory=dict)  # shape constant after pruning 8 -> 4
    q_dims: int | None = None
    x_shape: tuple[int | str, ...] = (1, 3, 4, 4)


def _i64(n: Net, name: str, v: list[int] | int) -> str:
    return n.const(name, v)


def _f32(n: Net, name: str, v: object) -> str:
    return n.const(name, v, F32)


def _bn(n: Net, y: str) -> str:
    var = _f32(n, "bn.var", np.linspace(0.5, 2.0, 8))
    return n.op("BatchNormalization", [y, n.w("bn.s", [8]), n.w("bn.b", [8]), n.w("bn.mean", [8]), var])


def _where_leaky(n: Net, y: str) -> str:
    return n.op("Where", [n.op("Greater", [y, _f32(n, "zero", 0.0)]), y, n.op("Mul", [y, _f32(n, "slope", 0.1)])])


def _shape_entry(index: list[int]) -> Build:
    """y * prod(Shape(y)[index]); index includes the dynamic batch so normalize cannot fold it."""

    def build(n: Net, y: str) -> str:
        entry = n.op("Gather", [n.op("Shape", [y]), _i64(n, "idx", index)], axis=0)
        return n.op("Mul", [y, n.op("ReduceProd", [n.op("Cast", [entry], to=1)])])

    return build


PASS: dict[str, Pass] = {
    # unary and broadcasting elementwise
    "relu": Pass(lambda n, y: n.op("Relu", [y])),
    "sigmoid_tanh": Pass(lambda n, y: n.op("Tanh", [n.op("Sigmoid", [y])])),
    "identity_cast": Pass(lambda n, y: n.op("Cast", [n.op("Identity", [y])], to=1)),
    "dropout_with_mask": Pass(lambda n, y: n.op("Dropout", [y], outputs=2)[0]),
    "mul_per_channel": Pass(lambda n, y: n.op("Mul", [y, n.w("c", [1, 8, 1, 1])]), labelled={"c": (1, "const")}),
    "add_per_channel_rank3": Pass(lambda n, y: n.op("Add", [y, n.w("c", [8, 1, 1])]), labelled={"c": (0, "const")}),
    "const_on_the_left": Pass(lambda n, y: n.op("Sub", [n.w("c", [8, 1, 1]), y]), labelled={"c": (0, "const")}),
    "div_scalar": Pass(lambda n, y: n.op("Div", [y, _f32(n, "c", 2.0)])),
    "add_spatial_const": Pass(lambda n, y: n.op("Add", [y, n.w("c", [1, 1, 4, 4])])),
    "prelu": Pass(lambda n, y: n.op("PRelu", [y, n.w("slope", [8, 1, 1])]), labelled={"slope": (0, "const")}),
    "clip": Pass(lambda n, y: n.op("Clip", [y, _f32(n, "lo", -1.0), _f32(n, "hi", 1.0)])),
    "pow": Pass(lambda n, y: n.op("Pow", [y, _f32(n, "two", 2.0)])),
    "where_leaky": Pass(_where_leaky),
    "max_of_two_views": Pass(lambda n, y: n.op("Max", [y, n.op("Relu", [y])])),
    "sum_variadic": Pass(lambda n, y: n.op("Sum", [y, n.op("Relu", [y]), n.w("c", [1, 8, 1, 1])]),
                         labelled={"c": (1, "const")}),
    # per-channel normalizations and ones over other axes
    "batchnorm": Pass(_bn, labelled={"bn.s": (0, "affine"), "bn.b": (0, "bias"), "bn.mean": (0, "stat"),
                                     "bn.var": (0, "stat")}),
    "instancenorm": Pass(lambda n, y: n.op("InstanceNormalization", [y, n.w("in.s", [8]), n.w("in.b", [8])]),
                         labelled={"in.s": (0, "affine"), "in.b": (0, "bias")}),
    "layernorm_spatial": Pass(lambda n, y: n.op("LayerNormalization", [y, n.w("ln.s", [4, 4]), n.w("ln.b", [4, 4])],
                                                axis=2)),
    "lpnorm_width": Pass(lambda n, y: n.op("LpNormalization", [y], axis=-1)),
    # axes spelled out: onnx's strict shape inference (used by graphprune.normalize) rejects MVN without them
    "mvn_per_channel_axes": Pass(lambda n, y: n.op("MeanVarianceNormalization", [y], axes=[0, 2, 3])),
    # reductions and softmax over non-channel axes
    "softmax_last": Pass(lambda n, y: n.op("Softmax", [y], axis=-1)),
    "softmax_opset11_from_axis2": Pass(lambda n, y: n.op("Softmax", [y], axis=2), opset=11),
    "logsoftmax_hardmax": Pass(lambda n, y: n.op("Hardmax", [n.op("LogSoftmax", [y], axis=3)], axis=2)),
    "reducemean_spatial": Pass(lambda n, y: n.op("ReduceMean", [y], axes=[2, 3])),
    "reducemean_axes_input_18": Pass(lambda n, y: n.op("ReduceMean", [y, _i64(n, "axes", [-1])]), opset=18),
    "reducemax_keepdims0": Pass(lambda n, y: n.op("ReduceMax", [y], axes=[3], keepdims=0), q_dims=1),
    "reducesum_noop_empty_axes": Pass(lambda n, y: n.op("ReduceSum", [y], noop_with_empty_axes=1), opset=13),
    "argmax_width": Pass(lambda n, y: n.op("Cast", [n.op("ArgMax", [y], axis=3)], to=1)),
    "topk_width": Pass(lambda n, y: n.op("TopK", [y, _i64(n, "k", [2])], outputs=2, axis=-1)[0]),
    "cumsum_height": Pass(lambda n, y: n.op("CumSum", [y, _i64(n, "axis", 2)])),
    # pooling, resize, pad on spatial axes
    "maxpool": Pass(lambda n, y: n.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])),
    "averagepool_lppool": Pass(lambda n, y: n.op("LpPool", [n.op("AveragePool", [y], kernel_shape=[2, 2])],
                                                 kernel_shape=[2, 2])),
    "globalpools": Pass(lambda n, y: n.op("GlobalMaxPool", [n.op("GlobalAveragePool", [y])])),
    "resize_scales": Pass(lambda n, y: n.op("Resize", [y, "", _f32(n, "scales", [1, 1, 2, 2])])),
    "resize_sizes": Pass(lambda n, y: n.op("Resize", [y, "", "", _i64(n, "sizes", [1, 8, 8, 8])]),
                         rewritten={"sizes": [1, 4, 8, 8]}),
    "pad_spatial": Pass(lambda n, y: n.op("Pad", [y, _i64(n, "pads", [0, 0, 1, 1, 0, 0, 1, 1])])),
    "pad_axes_input_18": Pass(lambda n, y: n.op("Pad", [y, _i64(n, "pads", [1, 0, 0, 1]), "", _i64(n, "ax", [2, 3])]),
                              opset=18),
    "pad_attribute_opset10": Pass(lambda n, y: n.op("Pad", [y], pads=[0, 0, 1, 0, 0, 0, 0, 1]), opset=10),
    # layout ops that keep the channel axis
    "transpose_round_trip": Pass(lambda n, y: n.op("Transpose", [n.op("Relu", [n.op("Transpose", [y],
                                                   perm=[0, 2, 3, 1])])], perm=[0, 3, 1, 2])),
    "unsqueeze_squeeze_13": Pass(lambda n, y: n.op("Squeeze", [n.op("Unsqueeze", [y, _i64(n, "a1", [2])]),
                                                               _i64(n, "a2", [2])]), opset=13),
    "unsqueeze_squeeze_11": Pass(lambda n, y: n.op("Squeeze", [n.op("Unsqueeze", [y], axes=[-1])], axes=[4]),
                                 opset=11),
    "expand_batch": Pass(lambda n, y: n.op("Expand", [y, _i64(n, "shape", [2, 8, 4, 4])]),
                         rewritten={"shape": [2, 4, 4, 4]}),
    "expand_with_ones": Pass(lambda n, y: n.op("Expand", [y, _i64(n, "shape", [2, 1, 1, 1])]),
                             rewritten={"shape": [2, 1, 1, 1]}),
    "tile_batch": Pass(lambda n, y: n.op("Tile", [y, _i64(n, "reps", [2, 1, 1, 1])])),
    "gather_rows": Pass(lambda n, y: n.op("Gather", [y, _i64(n, "idx", [0, 2])], axis=2)),
    "reshape_merge_spatial": Pass(lambda n, y: n.op("Reshape", [y, _i64(n, "shape", [1, 8, 16])]), q_dims=1,
                                  rewritten={"shape": [1, 4, 16]}),
    "reshape_copy_entries": Pass(lambda n, y: n.op("Reshape", [y, _i64(n, "shape", [0, 0, -1])]), q_dims=1,
                                 rewritten={"shape": [0, 0, -1]}),
    "shape_read_of_batch": Pass(_shape_entry([0]), x_shape=("N", 3, 4, 4)),
    "shape_start_end_batch_only": Pass(lambda n, y: n.op("Mul", [y, n.op("Cast", [n.op("Shape", [y], end=1)],
                                                                         to=1)]), x_shape=("N", 3, 4, 4)),
}


@pytest.mark.parametrize("case", PASS)
def test_op_passes_channels(case: str) -> None:
    c = PASS[case]
    m = sandwich(c.build, opset=c.opset, q_dims=c.q_dims, shape=c.x_shape)
    an = graphprune.analyze(m)

    g = group_of(an, "p.w", 0)
    assert g.size == 8 and g.prunable and not g.reasons, [str(r) for r in g.reasons]
    assert units(an, "q.w", 1) == units(an, "p.w", 0)
    assert params(g) == BASE | {(t, axis, role) for t, (axis, role) in c.labelled.items()}
    for t, (axis, _) in c.labelled.items():
        assert units(an, t, axis) == units(an, "p.w", 0)
    assert len(an.grouping.groups) == 2  # p's and q's, nothing else

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    assert len(kp) == 4
    assert kept(o["q.w"], p["q.w"], 1) == kp
    for t, (axis, _) in c.labelled.items():
        assert kept(o[t], p[t], axis) == kp
    for t, want in c.rewritten.items():
        assert p[t].tolist() == want


@dataclass
class Block:
    build: Build
    kind: BlockKind
    q_in: int = 8
    opset: int = 17
    c: int = 8
    q_dims: int | None = None
    x_shape: tuple[int | str, ...] = (1, 3, 4, 4)


def _mul_by_input(n: Net, y: str) -> str:
    return n.op("Mul", [y, n.input("s", [1, 8, 1, 1])])


def _quantize(n: Net, y: str) -> str:
    scale, zp = _f32(n, "qs", 0.1), n.const("qz", 128, np.uint8)
    return n.op("DequantizeLinear", [n.op("QuantizeLinear", [y, scale, zp]), scale, zp])


BLOCK: dict[str, Block] = {
    "softmax_channels": Block(lambda n, y: n.op("Softmax", [y], axis=1), BlockKind.REDUCES_CHANNELS),
    "softmax_opset11_from_axis1": Block(lambda n, y: n.op("Softmax", [y], axis=1), BlockKind.REDUCES_CHANNELS,
                                        opset=11),
    "logsoftmax_channels": Block(lambda n, y: n.op("LogSoftmax", [y], axis=-3), BlockKind.REDUCES_CHANNELS),
    "reducemean_channels": Block(lambda n, y: n.op("ReduceMean", [y], axes=[1]), BlockKind.REDUCES_CHANNELS,
                                 q_in=1),
    "reducesum_all_axes": Block(lambda n, y: n.op("ReduceSum", [y]), BlockKind.REDUCES_CHANNELS, q_in=1),
    "reducemax_axes_input_18": Block(lambda n, y: n.op("ReduceMax", [y, _i64(n, "axes", [1, 2])]),
                                     BlockKind.REDUCES_CHANNELS, q_in=1, opset=18),
    "argmax_channels": Block(lambda n, y: n.op("Cast", [n.op("ArgMax", [y], axis=1)], to=1),
                             BlockKind.REDUCES_CHANNELS, q_in=1),
    "topk_channels": Block(lambda n, y: n.op("TopK", [y, _i64(n, "k", [4])], outputs=2, axis=1)[0],
                           BlockKind.REDUCES_CHANNELS, q_in=4),
    "cumsum_channels": Block(lambda n, y: n.op("CumSum", [y, _i64(n, "axis", 1)]), BlockKind.REDUCES_CHANNELS),
    "layernorm_from_channels": Block(lambda n, y: n.op("LayerNormalization", [y, n.w("ln.s", [8, 4, 4])], axis=1),
                                     BlockKind.NORMALIZES_CHANNELS),
    "lpnorm_channels": Block(lambda n, y: n.op("LpNormalization", [y], axis=1), BlockKind.NORMALIZES_CHANNELS),
    "mvn_over_channels": Block(lambda n, y: n.op("MeanVarianceNormalization", [y], axes=[1, 2, 3]),
                               BlockKind.NORMALIZES_CHANNELS),
    "lrn": Block(lambda n, y: n.op("LRN", [y], size=3), BlockKind.NORMALIZES_CHANNELS),
    "pad_channels": Block(lambda n, y: n.op("Pad", [y, _i64(n, "pads", [0, 1, 0, 0, 0, 1, 0, 0])]),
                          BlockKind.LAYOUT, q_in=10),
    "pad_channel_axis_18": Block(lambda n, y: n.op("Pad", [y, _i64(n, "pads", [0, 2]), "", _i64(n, "ax", [1])]),
                                 BlockKind.LAYOUT, q_in=10, opset=18),
    "maxpool_indices": Block(lambda n, y: n.op("MaxPool", [y], outputs=2, kernel_shape=[2, 2])[0], BlockKind.LAYOUT),
    "resize_channels": Block(lambda n, y: n.op("Resize", [y, "", "", _i64(n, "sizes", [1, 16, 4, 4])]),
                             BlockKind.LAYOUT, q_in=16),
    "tile_channels": Block(lambda n, y: n.op("Tile", [y, _i64(n, "reps", [1, 2, 1, 1])]), BlockKind.LAYOUT, q_in=16),
    "expand_single_channel": Block(lambda n, y: n.op("Expand", [y, _i64(n, "shape", [1, 8, 4, 4])]),
                                   BlockKind.LAYOUT, c=1),
    "strided_slice_channels": Block(lambda n, y: n.op("Slice", [y, _i64(n, "s", [0]), _i64(n, "e", [8]),
                                                           _i64(n, "a", [1]), _i64(n, "st", [2])]),
                                    BlockKind.LAYOUT, q_in=4),
    "reshape_scrambles": Block(lambda n, y: n.op("Reshape", [y, _i64(n, "shape", [1, 4, 32])]), BlockKind.LAYOUT,
                               q_in=4, q_dims=1),
    "mul_by_fixed_input": Block(_mul_by_input, BlockKind.FIXED_OPERAND),
    "shape_read_of_channels": Block(_shape_entry([0, 1]), BlockKind.SHAPE_NOT_REWRITABLE, x_shape=("N", 3, 4, 4)),
    "shape_read_by_unknown_reader": Block(lambda n, y: n.op("Mul", [y, n.op("Cast", [n.op("Shape", [y])], to=1)]),
                                          BlockKind.SHAPE_NOT_REWRITABLE, x_shape=("N", 3, 4, 4)),
    "unknown_op": Block(lambda n, y: n.op("DepthToSpace", [y], blocksize=2), BlockKind.UNSUPPORTED_OP, q_in=2),
    "quantized": Block(_quantize, BlockKind.QUANTIZED),
}


@pytest.mark.parametrize("case", BLOCK)
def test_op_blocks_the_producer(case: str) -> None:
    b = BLOCK[case]
    m = sandwich(b.build, c=b.c, opset=b.opset, q_in=b.q_in, q_dims=b.q_dims, shape=b.x_shape)
    an = graphprune.analyze(m)

    g = group_of(an, "p.w", 0)
    assert g.size == b.c and not g.prunable and g.blocked.all()
    assert kinds(g) == {b.kind}, [str(r) for r in g.reasons]
    assert ("p.b", 0, "bias") in params(g)
    with pytest.raises(graphprune.TargetImpossibleError):
        graphprune.prune(m, sparsity=0.5, latency_runs=0)
