"""Gemm (transA/transB, bias shapes), MatMul with a constant of rank 2 or 3 on either side,
MatMul of two activations (Q·Kᵀ contracted dims, attention heads through batch dims), Gather."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto
from rules.helpers import Net, arrays, group_of, kept, kinds, params, pruned, unit_index, units

import graphprune
from graphprune.reasons import BlockKind


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [[8], [1, 8]])
def test_gemm_chain(trans_b: int, trans_a: int, bias_shape: list[int]) -> None:
    n = Net()
    w1 = n.w("w1", [8, 6] if trans_b else [6, 8])
    y = n.op("Relu", [n.op("Gemm", [n.input("x", [2, 6]), w1, n.w("b1", bias_shape)], transB=trans_b)])
    if trans_a:
        y = n.op("Transpose", [y])
    w2 = n.w("w2", [5, 8] if trans_b else [8, 5])
    n.output(n.op("Gemm", [y, w2], transA=trans_a, transB=trans_b))
    m = n.model()
    an = graphprune.analyze(m)

    out_axis, in_axis, b_axis = (0 if trans_b else 1), (1 if trans_b else 0), len(bias_shape) - 1
    g = group_of(an, "w1", out_axis)
    assert g.size == 8 and g.prunable
    assert units(an, "w2", in_axis) == units(an, "b1", b_axis) == units(an, "w1", out_axis)
    assert params(g) == {("w1", out_axis, "out"), ("b1", b_axis, "bias"), ("w2", in_axis, "in")}
    assert 1 - out_axis not in an.graph.tracked("w1")

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    k1 = kept(o["w1"], p["w1"], out_axis)
    assert len(k1) == 4
    assert kept(o["b1"], p["b1"], b_axis) == k1 == kept(o["w2"], p["w2"], in_axis)


# where the constant sits and its shape; the activation x is [2, 3, 6] (or [2, 6, 3] when on the right)
MATMULS = {
    "rank2_right": ("right", [6, 8], [8, 5]),
    "rank3_right": ("right", [2, 6, 8], [2, 8, 5]),
    "rank2_left": ("left", [8, 6], [5, 8]),
    "rank3_left": ("left", [2, 8, 6], [2, 5, 8]),
}


@pytest.mark.parametrize("case", MATMULS)
def test_matmul_with_a_constant(case: str) -> None:
    side, s1, s2 = MATMULS[case]
    n = Net()
    if side == "right":
        y = n.op("MatMul", [n.input("x", [2, 3, 6]), n.w("w1", s1)])
        n.output(n.op("MatMul", [n.op("Relu", [y]), n.w("w2", s2)]))
        out_axis, in_axis = len(s1) - 1, len(s2) - 2
    else:
        y = n.op("MatMul", [n.w("w1", s1), n.input("x", [2, 6, 3])])
        n.output(n.op("MatMul", [n.w("w2", s2), n.op("Relu", [y])]))
        out_axis, in_axis = len(s1) - 2, len(s2) - 1
    m = n.model()
    an = graphprune.analyze(m)

    g = group_of(an, "w1", out_axis)
    assert g.size == 8 and g.prunable
    assert units(an, "w2", in_axis) == units(an, "w1", out_axis)
    assert params(g) == {("w1", out_axis, "out"), ("w2", in_axis, "in")}
    assert set(an.graph.tracked("w1")) == {out_axis}  # batch and contracted axes of w1 stay

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    k1 = kept(o["w1"], p["w1"], out_axis)
    assert len(k1) == 4 and kept(o["w2"], p["w2"], in_axis) == k1


def test_q_kt_couples_the_contracted_dims() -> None:
    """S = Q·Kᵀ sums over the 8 features of Q and K: both lose the same positions; S itself has none."""
    n = Net()
    x = n.input("x", [2, 3, 6])
    q = n.op("MatMul", [x, n.w("wq", [6, 8])])
    kt = n.op("Transpose", [n.op("MatMul", [x, n.w("wk", [6, 8])])], perm=[0, 2, 1])
    s = n.op("Softmax", [n.op("MatMul", [q, kt], name="scores")], axis=-1)
    o = n.op("MatMul", [s, n.op("MatMul", [x, n.w("wv", [6, 8])])])
    n.output(n.op("MatMul", [o, n.w("wo", [8, 5])]))
    m = n.model()
    an = graphprune.analyze(m)

    gq, gv = group_of(an, "wq", 1), group_of(an, "wv", 1)
    assert gq.id != gv.id and gq.size == gv.size == 8 and gq.prunable and gv.prunable
    assert units(an, "wk", 1) == units(an, "wq", 1)
    assert unit_index(an, "wq", 1) == list(range(8))
    assert units(an, "wo", 0) == units(an, "wv", 1)
    assert params(gq) == {("wq", 1, "out"), ("wk", 1, "out")}
    assert params(gv) == {("wv", 1, "out"), ("wo", 0, "in")}
    assert an.graph.tracked("scores") == {}
    assert {(c.node, c.index) for c in an.graph.consumes if c.node == "scores"} == {("scores", 0), ("scores", 1)}

    res = pruned(m)
    o_, p = arrays(m), arrays(res.model)
    kq, kv = kept(o_["wq"], p["wq"], 1), kept(o_["wv"], p["wv"], 1)
    assert len(kq) == len(kv) == 4
    assert kept(o_["wk"], p["wk"], 1) == kq and kept(o_["wo"], p["wo"], 0) == kv


def test_q_kt_with_a_fixed_operand_blocks() -> None:
    n = Net()
    q = n.op("MatMul", [n.input("x", [2, 3, 6]), n.w("wq", [6, 8])])
    n.output(n.op("MatMul", [q, n.input("kt", [2, 8, 3])]))
    an = graphprune.analyze(n.model())
    assert kinds(group_of(an, "wq", 1)) == {BlockKind.FIXED_OPERAND}


@pytest.mark.parametrize("heads", [2, 4])
def test_attention_heads_couple_through_batch_dims(heads: int) -> None:
    """Heads of Q, K and V are coupled by the batched MatMuls; each head (8/heads channels) is a unit."""
    dim = 8 // heads
    n = Net()
    x = n.input("x", [1, 3, 6])

    def project(name: str, perm: list[int]) -> str:
        y = n.op("MatMul", [x, n.w(name, [6, 8])])
        y = n.op("Reshape", [y, n.const(f"{name}_shape", [1, 3, heads, dim])])
        return n.op("Transpose", [y], perm=perm)

    q, k, v = project("wq", [0, 2, 1, 3]), project("wk", [0, 2, 3, 1]), project("wv", [0, 2, 1, 3])
    s = n.op("Softmax", [n.op("MatMul", [q, k], name="scores")], axis=-1)
    o = n.op("Transpose", [n.op("MatMul", [s, v])], perm=[0, 2, 1, 3])
    o = n.op("Reshape", [o, n.const("merge_shape", [1, 3, 8])])
    n.output(n.op("MatMul", [o, n.w("wo", [8, 5])]))
    m = n.model()
    an = graphprune.analyze(m)

    g = group_of(an, "wq", 1)
    assert g.size == heads and g.prunable
    assert unit_index(an, "wq", 1) == [h for h in range(heads) for _ in range(dim)]
    assert units(an, "wk", 1) == units(an, "wv", 1) == units(an, "wo", 0) == units(an, "wq", 1)
    assert params(g) == {("wq", 1, "out"), ("wk", 1, "out"), ("wv", 1, "out"), ("wo", 0, "in")}
    assert set(an.graph.tracked("scores")) == {1}  # the head axis of the scores
    assert len(an.grouping.groups) == 2  # the heads and wo's (output) features

    res = pruned(m)
    o_, p = arrays(m), arrays(res.model)
    kq = kept(o_["wq"], p["wq"], 1)
    left = sorted({c // dim for c in kq})
    assert len(left) == heads // 2 and kq == [h * dim + j for h in left for j in range(dim)]
    for w, axis in (("wk", 1), ("wv", 1), ("wo", 0)):
        assert kept(o_[w], p[w], axis) == kq
    for name in ("wq_shape", "wk_shape", "wv_shape"):
        assert p[name].tolist() == [1, 3, heads // 2, dim]
    assert p["merge_shape"].tolist() == [1, 3, 4]


def test_gather_embedding_table_is_a_producer() -> None:
    n = Net()
    y = n.op("Gather", [n.w("emb", [10, 6]), n.input("ids", [2, 3], TensorProto.INT64)])
    n.output(n.op("MatMul", [y, n.w("w", [6, 4])]))
    m = n.model()
    an = graphprune.analyze(m)

    g = group_of(an, "emb", 1)
    assert g.size == 6 and g.prunable and g.producers == ["gather1"]
    assert units(an, "w", 0) == units(an, "emb", 1)
    assert params(g) == {("emb", 1, "out"), ("w", 0, "in")}
    assert 0 not in an.graph.tracked("emb")  # the vocabulary is never pruned

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    ke = kept(o["emb"], p["emb"], 1)
    assert len(ke) == 3 and kept(o["w"], p["w"], 0) == ke
    assert p["emb"].shape == (10, 3)


def test_gather_on_an_activation_moves_axes() -> None:
    """Gather of one time step [B, T, C] -> [B, C]: the channel axis moves from 2 to 1."""
    n = Net()
    y = n.op("MatMul", [n.input("x", [2, 3, 6]), n.w("w1", [6, 8])])
    y = n.op("Gather", [y, n.const("t", np.int64(1))], axis=1, name="step")
    n.output(n.op("Gemm", [y, n.w("w2", [8, 5])]))
    m = n.model()
    an = graphprune.analyze(m)
    assert set(an.graph.tracked("step")) == {1}
    assert units(an, "w2", 0) == units(an, "w1", 1)

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    assert kept(o["w2"], p["w2"], 0) == kept(o["w1"], p["w1"], 1)


@pytest.mark.parametrize("order", ["as_strided", "reversed"])
def test_gather_with_constant_indices_into_flattened_channels(order: str) -> None:
    """[B, C, 1, 1] -> Reshape [-1] -> Gather(constant [B, C, 1, 1] indices): the torch dynamo exporter's
    as_strided. The picked channels vary along one axis of the indices, so they land there, and the
    indices are rewritten to the kept channels' new positions."""
    n = Net()
    y = n.conv(n.input("x", [2, 3, 4, 4]), 3, 8, "p")
    y = n.op("ReduceMean", [y], axes=[2, 3], keepdims=1)
    flat = n.op("Reshape", [y, n.const("flat", [-1])])
    channel = np.arange(8) if order == "as_strided" else np.arange(8)[::-1]
    index = (np.arange(2)[:, None] * 8 + channel[None, :]).reshape(2, 8, 1, 1)
    y = n.op("Gather", [flat, n.const("idx", index)], axis=0, name="strided")
    y = n.op("Flatten", [y], axis=1)
    n.output(n.op("Gemm", [y, n.w("w2", [8, 5])]))
    m = n.model()
    an = graphprune.analyze(m)
    assert set(an.graph.tracked("strided")) == {1}
    assert units(an, "w2", 0) == units(an, "p.w", 0)[:: 1 if order == "as_strided" else -1]

    res = pruned(m)  # checks the pruned model against the original with the removed columns zeroed
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    assert 0 < len(kp) < 8
    assert kept(o["w2"], p["w2"], 0) == (kp if order == "as_strided" else sorted(7 - c for c in kp))
    new_index = p["idx"].reshape(2, -1)
    assert new_index.tolist() == [[b * len(kp) + (i if order == "as_strided" else len(kp) - 1 - i)
                                   for i in range(len(kp))] for b in range(2)]


def test_gather_of_some_channels_keeps_those_units() -> None:
    """Gather(channels [0, 2]) of 8: the picked channels go on; the others feed nothing else."""
    n = Net()
    y = n.conv(n.input("x", [1, 3, 4, 4]), 3, 8, "p")
    y = n.op("Gather", [y, n.const("idx", np.array([0, 2]))], axis=1, name="picked")
    n.output(n.conv(y, 2, 3, "q"))
    m = n.model()
    an = graphprune.analyze(m)
    assert units(an, "q.w", 1) == [units(an, "p.w", 0)[0], units(an, "p.w", 0)[2]]
    pruned(m)  # equivalent to the original with the removed channels' columns zeroed
