"""Channels tracked on an axis that is NOT the op's own channel axis (a Linear's features used as a
conv's width, ids that carry channels, a bias that is an activation) and shape vectors that do not
list every axis. Each rule must pass such an axis on exactly or block it, never drop it: a dropped
axis lets its producer shrink a tensor its consumer still expects whole."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from onnx import TensorProto
from rules.helpers import Net, arrays, group_of, kept, kinds, params, pruned, sandwich, units

import graphprune
from graphprune.reasons import BlockKind


def _features_then(op_build: str, x_shape: list[int], opset: int = 17) -> Net:
    """x -> MatMul 'w1' (8 fresh features on the LAST axis) -> op -> MatMul 'w2' (reads that axis)."""
    n = Net(opset)
    y = n.op("MatMul", [n.input("x", x_shape), n.w("w1", [x_shape[-1], 8])])
    if op_build == "instancenorm":
        y = n.op("InstanceNormalization", [y, n.w("s", [x_shape[1]]), n.w("b", [x_shape[1]])])
    elif op_build.startswith("batchnorm"):
        c = x_shape[1]
        ins = [y, n.w("s", [c]), n.w("b", [c]), n.w("mean", [c]), n.const("var", np.linspace(0.5, 2, c), np.float32)]
        training = op_build == "batchnorm_training"
        y = n.op("BatchNormalization", ins, outputs=3 if training else 1, training_mode=int(training))
        y = y[0] if training else y
    elif op_build == "groupnorm":
        y = n.op("GroupNormalization", [y, n.w("s", [x_shape[1]]), n.w("b", [x_shape[1]])], num_groups=2)
    elif op_build in ("Conv", "ConvTranspose"):
        y = n.conv(y, x_shape[1], x_shape[1], "c", k=3, op=op_build)
    n.output(n.op("MatMul", [y, n.w("w2", [8, 5])]), shape=[*x_shape[:-1], 5])
    return n


@pytest.mark.parametrize(("op", "kind"), [
    ("instancenorm", BlockKind.NORMALIZES_CHANNELS),  # statistics over the spatial axes
    ("groupnorm", BlockKind.NORMALIZES_CHANNELS),
    ("batchnorm_training", BlockKind.NORMALIZES_CHANNELS),  # batch statistics over N and space
    ("Conv", BlockKind.LAYOUT),  # the kernel slides along (and mixes) those positions
    ("ConvTranspose", BlockKind.LAYOUT),
])
def test_norm_or_conv_over_a_tracked_spatial_axis_blocks(op: str, kind: BlockKind) -> None:
    n = _features_then(op, [2, 4, 3, 6] if op in ("Conv", "ConvTranspose") else [2, 4, 6],
                       opset=21 if op == "groupnorm" else 17)
    m = n.model()
    an = graphprune.analyze(m)
    g = group_of(an, "w1", 1)
    assert g.size == 8 and not g.prunable and kinds(g) == {kind}, [str(r) for r in g.reasons]
    with pytest.raises(graphprune.TargetImpossibleError):
        graphprune.prune(m, sparsity=0.5, latency_runs=0)


def test_inference_batchnorm_passes_a_tracked_spatial_axis() -> None:
    m = _features_then("batchnorm", [2, 4, 6]).model()
    an = graphprune.analyze(m)
    assert units(an, "w2", 0) == units(an, "w1", 1) and group_of(an, "w1", 1).prunable
    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    assert kept(o["w2"], p["w2"], 0) == kept(o["w1"], p["w1"], 1)


def test_conv_passes_a_tracked_batch_axis() -> None:
    """W1·x makes 8 rows that become the batch of a conv: each conv sample is independent."""
    n = Net()
    y = n.op("MatMul", [n.w("w1", [8, 6]), n.input("x", [6, 48])])
    y = n.conv(n.op("Reshape", [y, n.const("to_nchw", [8, 3, 4, 4])], name="nchw"), 3, 5, "c")
    y = n.op("Reshape", [y, n.const("to_rows", [8, 80])])
    n.output(n.op("MatMul", [n.w("w2", [4, 8]), y]))
    m = n.model()
    an = graphprune.analyze(m)
    assert units(an, "nchw", 0) == units(an, "c", 0) == units(an, "w2", 1) == units(an, "w1", 0)
    assert group_of(an, "w1", 0).prunable

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    k1 = kept(o["w1"], p["w1"], 0)
    assert len(k1) == 4 and kept(o["w2"], p["w2"], 1) == k1
    assert p["to_nchw"].tolist() == [4, 3, 4, 4] and p["to_rows"].tolist() == [4, 80]


def test_instancenorm_still_passes_and_labels_its_channel_axis() -> None:
    m = sandwich(lambda n, y: n.op("InstanceNormalization", [y, n.w("s", [8]), n.w("b", [8])]))
    an = graphprune.analyze(m)
    assert units(an, "q.w", 1) == units(an, "s", 0) == units(an, "p.w", 0)


def test_gemm_bias_that_is_an_activation_is_coupled_like_an_add() -> None:
    """y = x·W1 + h (torch.addmm(h, x, W1)): h's producer and W1 must lose the same features."""
    n = Net()
    x = n.input("x", [2, 6])
    h = n.op("Gemm", [x, n.w("w0", [6, 8])])
    y = n.op("Gemm", [x, n.w("w1", [6, 8]), h])
    n.output(n.op("Gemm", [y, n.w("w2", [8, 5])]))
    m = n.model()
    an = graphprune.analyze(m)
    g = group_of(an, "w1", 1)
    assert units(an, "w0", 1) == units(an, "w1", 1) == units(an, "w2", 0)
    assert g.prunable and params(g) == {("w0", 1, "out"), ("w1", 1, "out"), ("w2", 0, "in")}

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    k0 = kept(o["w0"], p["w0"], 1)
    assert len(k0) == 4 and kept(o["w1"], p["w1"], 1) == k0 == kept(o["w2"], p["w2"], 0)


def test_gemm_bias_activation_with_fixed_rows_blocks() -> None:
    """h is tracked on the rows (M) of the Gemm, whose A operand has fixed rows."""
    n = Net()
    h = n.op("Transpose", [n.op("MatMul", [n.input("x", [3, 2]), n.w("w0", [2, 4])])])  # [4, 3], rows tracked
    n.output(n.op("Gemm", [n.input("a", [4, 5]), n.w("w1", [5, 3]), h]))
    an = graphprune.analyze(n.model())
    assert kinds(group_of(an, "w0", 1)) == {BlockKind.FIXED_OPERAND}


def test_gather_with_ids_that_carry_channels() -> None:
    """ids = ArgMax over the width keeps p's channels on axis 1; the looked-up rows follow them."""
    n = Net()
    y = n.conv(n.input("x", [1, 3, 4, 4]), 3, 8, "p")
    ids = n.op("ArgMax", [y], axis=3, keepdims=0)  # [1, 8, 4]
    e = n.op("Gather", [n.w("emb", [4, 5]), ids], name="lookup")  # [1, 8, 4, 5]
    n.output(n.conv(e, 8, 3, "q"))
    m = n.model()
    an = graphprune.analyze(m)
    assert set(an.graph.tracked("lookup")) == {1, 3}
    assert units(an, "q.w", 1) == units(an, "lookup", 1) == units(an, "p.w", 0)
    assert units(an, "lookup", 3) == units(an, "emb", 1)
    assert kinds(group_of(an, "emb", 1)) == {BlockKind.LAYOUT}  # the table's features are q's width

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    assert len(kp) == 4 and kept(o["q.w"], p["q.w"], 1) == kp
    assert p["emb"].shape == (4, 5)


@pytest.mark.parametrize(("shape", "rewritten"), [([2, 3], [2, 3]), ([1], [1]), ([1, 8, 1, 1], [1, 4, 1, 1])])
def test_expand_with_a_shape_vector_shorter_than_the_output(shape: list[int], rewritten: list[int]) -> None:
    """Expand's shape entries are right-aligned: [2, 3] describes H and W only, not the channels."""
    m = sandwich(lambda n, y: n.op("Expand", [y, n.const("shape", shape)]), shape=(1, 3, 2, 3))
    an = graphprune.analyze(m)
    assert units(an, "q.w", 1) == units(an, "p.w", 0)
    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    assert kept(o["q.w"], p["q.w"], 1) == kept(o["p.w"], p["p.w"], 0)
    assert p["shape"].tolist() == rewritten


@pytest.mark.parametrize(("axes", "sizes", "rewritten"), [([2, 3], [8, 8], [8, 8]), ([1, 3], [8, 8], [4, 8])])
def test_resize18_sizes_for_listed_axes_only(axes: list[int], sizes: list[int], rewritten: list[int]) -> None:
    m = sandwich(lambda n, y: n.op("Resize", [y, "", "", n.const("sizes", sizes)], axes=axes), opset=18)
    an = graphprune.analyze(m)
    assert units(an, "q.w", 1) == units(an, "p.w", 0)
    res = pruned(m)
    p = arrays(res.model)
    assert p["sizes"].tolist() == rewritten


Reader = list[int] | tuple[int, int, int] | None


def _shape_reader(shape_attrs: dict[str, int], reader: Reader) -> Callable[[Net, str], str]:
    """y * f(Shape(y)): a Cast reads every entry (an unknown reader, None), a Gather the listed
    entries, a Slice (start, end, step) its range; what is read is reduced to one scale."""

    def build(n: Net, y: str) -> str:
        s = n.op("Shape", [y], **shape_attrs)
        if isinstance(reader, list):
            s = n.op("Gather", [s, n.const("idx", reader)])
        elif isinstance(reader, tuple):
            start, end, step = reader
            s = n.op("Slice", [s, n.const("s", [start]), n.const("e", [end]), n.const("a", [0]), n.const("st", [step])])
        v = n.op("Cast", [s], to=TensorProto.FLOAT)
        return n.op("Mul", [y, v if reader is None else n.op("ReduceProd", [v])])

    return build


# Shape(start/end) of a [N, 8, H, 3] activation and who reads it; N and H are dynamic so nothing folds
SHAPE_READS = {
    "start_-3_reads_C_H_W": ({"start": -3}, None, True),
    "end_-3_reads_N_only": ({"end": -3}, None, False),
    "start_1_reads_C_H_W": ({"start": 1}, None, True),
    "gather_-3_is_C": ({}, [0, -3], True),
    "gather_-4_is_N": ({}, [0, -4], False),
    "slice_N_only": ({}, (0, 1, 1), False),
    "slice_reversed_all": ({}, (-1, -(2**62), -1), True),
    "slice_from_C_of_start_-4": ({"start": -4}, (1, 3, 1), True),
}


@pytest.mark.parametrize("case", SHAPE_READS)
def test_shape_reads_with_negative_bounds_and_indices(case: str) -> None:
    attrs, reader, blocks = SHAPE_READS[case]
    m = sandwich(_shape_reader(attrs, reader), shape=("N", 3, "H", 3))
    an = graphprune.analyze(m)
    g = group_of(an, "p.w", 0)
    if blocks:
        assert kinds(g) == {BlockKind.SHAPE_NOT_REWRITABLE} and not g.prunable
        with pytest.raises(graphprune.TargetImpossibleError):
            graphprune.prune(m, sparsity=0.5, latency_runs=0)
    else:
        assert g.prunable and not g.reasons
        res = pruned(m)
        o, p = arrays(m), arrays(res.model)
        assert kept(o["q.w"], p["q.w"], 1) == kept(o["p.w"], p["p.w"], 0)
