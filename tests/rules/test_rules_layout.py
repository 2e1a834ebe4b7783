"""Ops that move, merge or split the channel axis: Flatten/Reshape into a Gemm (blocks of
positions), Reshape into heads (a head is one unit), NHWC Transpose-Conv-Transpose, Squeeze/Unsqueeze."""

from __future__ import annotations

import pytest
from rules.helpers import Net, arrays, group_of, kept, kinds, params, pruned, repeat_each, unit_index, units

import graphprune
from graphprune.reasons import BlockKind

# how the 4-channel 2x2 map becomes a [batch, 16] matrix
FLATTENS = {
    "flatten": None,
    "reshape_explicit": [1, 16],
    "reshape_infer": [1, -1],
    "reshape_copy_batch": [0, -1],
}


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("how", FLATTENS)
def test_flatten_makes_each_channel_a_block_of_positions(how: str, trans_b: int) -> None:
    n = Net()
    y = n.conv(n.input("x", [1, 3, 2, 2]), 3, 4, "p")
    shape = FLATTENS[how]
    y = n.op("Flatten", [y]) if shape is None else n.op("Reshape", [y, n.const("shape", shape)])
    w = n.w("fc.w", [5, 16] if trans_b else [16, 5])
    n.output(n.op("Gemm", [y, w, n.w("fc.b", [5])], transB=trans_b))
    m = n.model()
    an = graphprune.analyze(m)

    k_axis = 1 if trans_b else 0
    g = group_of(an, "p.w", 0)
    assert g.size == 4 and g.prunable
    # Gemm column 4c + j (j over the 2x2 positions) is channel c
    assert units(an, "fc.w", k_axis) == repeat_each(units(an, "p.w", 0), 4)
    assert params(g) == {("p.w", 0, "out"), ("p.b", 0, "bias"), ("fc.w", k_axis, "in")}

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    assert len(kp) == 2
    assert kept(o["fc.w"], p["fc.w"], k_axis) == [4 * c + j for c in kp for j in range(4)]
    if shape is not None:
        assert p["shape"].tolist() == {"reshape_explicit": [1, 8]}.get(how, shape)


# Reshape shape constants into heads and back; entries that are -1/0 must stay as they are
HEADS = {
    "2_heads_explicit": (2, [1, 3, 2, 4], [1, 3, 8]),
    "2_heads_infer": (2, [0, 0, -1, 4], [0, 0, -1]),
    "4_heads_of_2": (4, [1, 3, 4, 2], [1, 3, 8]),
}


@pytest.mark.parametrize("case", HEADS)
def test_reshape_into_heads_makes_each_head_one_unit(case: str) -> None:
    heads, split_shape, merge_shape = HEADS[case]
    dim = 8 // heads
    n = Net()
    y = n.op("MatMul", [n.input("x", [1, 3, 6]), n.w("wq", [6, 8])])
    y = n.op("Reshape", [y, n.const("split_shape", split_shape)], name="split")
    y = n.op("Transpose", [y], perm=[0, 2, 1, 3], name="bhtd")
    y = n.op("Transpose", [n.op("Relu", [y])], perm=[0, 2, 1, 3])
    y = n.op("Reshape", [y, n.const("merge_shape", merge_shape)])
    n.output(n.op("MatMul", [y, n.w("wo", [8, 5])]))
    m = n.model()
    an = graphprune.analyze(m)

    g = group_of(an, "wq", 1)
    assert g.size == heads and g.prunable
    assert unit_index(an, "wq", 1) == repeat_each(range(heads), dim)
    assert units(an, "wo", 0) == units(an, "wq", 1)
    assert set(an.graph.tracked("split")) == {2} and set(an.graph.tracked("bhtd")) == {1}
    assert unit_index(an, "bhtd", 1) == list(range(heads))
    assert params(g) == {("wq", 1, "out"), ("wo", 0, "in")}

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kq = kept(o["wq"], p["wq"], 1)
    left = sorted({c // dim for c in kq})
    assert len(left) == heads // 2 and kq == [h * dim + j for h in left for j in range(dim)]
    assert kept(o["wo"], p["wo"], 0) == kq
    if -1 in split_shape:
        assert p["split_shape"].tolist() == split_shape and p["merge_shape"].tolist() == merge_shape
    else:
        assert p["split_shape"].tolist() == [1, 3, heads // 2, dim] and p["merge_shape"].tolist() == [1, 3, 4]


@pytest.mark.parametrize("consumer", ["matmul", "conv"])
def test_nhwc_transpose_conv_transpose(consumer: str) -> None:
    """TF-style exports: NHWC activations, each conv wrapped in Transposes; the channel axis moves 3->1->3."""
    n = Net()
    y = n.op("Transpose", [n.input("x", [1, 4, 4, 3])], perm=[0, 3, 1, 2])
    y = n.op("Transpose", [n.conv(y, 3, 8, "p")], perm=[0, 2, 3, 1], name="nhwc")
    y = n.op("Relu", [y])
    if consumer == "matmul":
        n.output(n.op("MatMul", [y, n.w("q.w", [8, 5])]))
        q_axis = 0
    else:
        y = n.conv(n.op("Transpose", [y], perm=[0, 3, 1, 2]), 8, 5, "q")
        n.output(n.op("Transpose", [y], perm=[0, 2, 3, 1]))
        q_axis = 1
    m = n.model()
    an = graphprune.analyze(m)

    assert set(an.graph.tracked("nhwc")) == {3}
    assert units(an, "nhwc", 3) == units(an, "p.w", 0) == units(an, "q.w", q_axis)
    assert group_of(an, "p.w", 0).prunable

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    assert len(kp) == 4 and kept(o["q.w"], p["q.w"], q_axis) == kp


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("squeeze_axes", [[2, 3], None])
def test_squeeze_into_gemm_and_unsqueeze_into_conv(opset: int, squeeze_axes: list[int] | None) -> None:
    n = Net(opset)
    y = n.op("GlobalAveragePool", [n.conv(n.input("x", [2, 3, 4, 4]), 3, 8, "p")])
    if squeeze_axes is None:
        y = n.op("Squeeze", [y])
    elif opset < 13:
        y = n.op("Squeeze", [y], axes=squeeze_axes)
    else:
        y = n.op("Squeeze", [y, n.const("sq_axes", squeeze_axes)])
    y = n.op("Gemm", [y, n.w("fc.w", [6, 8]), n.w("fc.b", [6])], transB=1)
    if opset < 13:
        y = n.op("Unsqueeze", [y], axes=[-1, -2])
    else:
        y = n.op("Unsqueeze", [y, n.const("unsq_axes", [2, 3])])
    n.output(n.conv(y, 6, 3, "q"))
    m = n.model()
    an = graphprune.analyze(m)

    assert units(an, "fc.w", 1) == units(an, "p.w", 0)
    assert units(an, "q.w", 1) == units(an, "fc.b", 0) == units(an, "fc.w", 0)
    gp, gf = group_of(an, "p.w", 0), group_of(an, "fc.w", 0)
    assert gp.id != gf.id and gp.prunable and gf.prunable and (gp.size, gf.size) == (8, 6)

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp, kf = kept(o["p.w"], p["p.w"], 0), kept(o["fc.b"], p["fc.b"], 0)
    assert (len(kp), len(kf)) == (4, 3)
    assert kept(o["fc.w"], p["fc.w"], 1, axis0=kf) == kp
    assert kept(o["q.w"], p["q.w"], 1) == kf


def test_squeeze_of_a_single_channel_axis_blocks() -> None:
    """A 1-channel conv squeezed on its channel axis: that axis vanishes, so it cannot be followed."""
    n = Net()
    y = n.conv(n.input("x", [1, 3, 4, 4]), 3, 1, "p")
    y = n.op("Squeeze", [y, n.const("axes", [1])])
    n.output(n.op("MatMul", [y, n.w("m.w", [4, 4])]))
    an = graphprune.analyze(n.model())
    assert kinds(group_of(an, "p.w", 0)) == {BlockKind.LAYOUT}
