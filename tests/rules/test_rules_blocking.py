"""What has no rule blocks the channels it reads, with the right kind: custom-domain ops, recurrent
ops, control flow (and tensors read inside its bodies), and graph outputs."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper
from rules.helpers import Net, arrays, group_of, kept, kinds, pruned, units

import graphprune
from graphprune.errors import InvalidModelError
from graphprune.reasons import BlockKind


def test_custom_domain_op_blocks_its_inputs() -> None:
    """An onnxruntime contrib op (com.microsoft) has no rule here: its inputs stay whole."""
    n = Net(extra_opsets={"com.microsoft": 1})
    y = n.conv(n.input("x", [1, 3, 4, 4]), 3, 8, "p")
    n.output(n.op("BiasGelu", [y, n.w("bias", [4])], domain="com.microsoft"), shape=[1, 8, 4, 4])
    an = graphprune.analyze(n.model())
    g = group_of(an, "p.w", 0)
    assert not g.prunable and kinds(g) == {BlockKind.CUSTOM_DOMAIN}
    assert [r.op for r in g.reasons] == ["BiasGelu"]


def test_an_op_nothing_implements_is_refused_at_load_by_inspect_and_prune() -> None:
    """No custom-op library is loaded, so such a model could never be validated: refused before analysis,
    naming the node, op and domain (prune used to fail late in onnxruntime, inspect not at all)."""
    n = Net(extra_opsets={"com.example": 1})
    y = n.conv(n.input("x", [1, 3, 4, 4]), 3, 8, "p")
    n.output(n.op("Mystery", [y], domain="com.example", name="m"), shape=[1, 8, 4, 4])
    for run in (graphprune.analyze, lambda m: graphprune.prune(m, sparsity=0.3)):
        with pytest.raises(InvalidModelError, match=r"'m'.*op 'Mystery' of domain 'com.example'.*standard ONNX ops"):
            run(n.model())


@pytest.mark.parametrize(("op", "gates"), [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_recurrent_op_reads_its_input_features_and_its_outputs_stay(op: str, gates: int) -> None:
    """W's last axis consumes the features (rules/recurrent.py), so the MatMul before it is prunable;
    the hidden units reach a graph output here, so they stay."""
    n = Net()
    y = n.op("MatMul", [n.input("x", [3, 1, 6]), n.w("w1", [6, 8])])
    ins = [y, n.w("rw", [1, gates * 4, 8]), n.w("rr", [1, gates * 4, 4])]
    n.output(n.op(op, ins, hidden_size=4, name="rnn"))
    an = graphprune.analyze(n.model())
    assert group_of(an, "w1", 1).prunable
    hidden = group_of(an, "rr", 2)
    assert not hidden.prunable and kinds(hidden) == {BlockKind.GRAPH_OUTPUT}


def test_if_blocks_tensors_read_inside_its_bodies() -> None:
    n = Net()
    y = n.conv(n.input("x", [1, 3, 4, 4]), 3, 8, "p")
    z = n.conv(y, 8, 4, "q")
    out = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 8, 4, 4])
    then = helper.make_graph([helper.make_node("Identity", [y], ["b"])], "then", [], [out])
    other = helper.make_graph([helper.make_node("Relu", [y], ["b"])], "else", [], [out])
    n.output(z, n.op("If", [n.input("cond", [], TensorProto.BOOL)], then_branch=then, else_branch=other))
    an = graphprune.analyze(n.model())
    g = group_of(an, "p.w", 0)
    assert not g.prunable and kinds(g) == {BlockKind.CONTROL_FLOW}
    assert units(an, "q.w", 1) == units(an, "p.w", 0)  # coupled as usual, just fixed


def test_graph_output_blocks_even_a_consumed_tensor() -> None:
    n = Net()
    y = n.conv(n.input("x", [1, 3, 4, 4]), 3, 8, "p")
    a = n.conv(n.input("x2", [1, 3, 4, 4]), 3, 6, "a")
    n.output(n.conv(n.op("Add", [n.conv(y, 8, 6, "q"), a]), 6, 2, "r"), y)
    m = n.model()
    an = graphprune.analyze(m)

    gp = group_of(an, "p.w", 0)
    assert not gp.prunable and kinds(gp) == {BlockKind.GRAPH_OUTPUT} and units(an, "q.w", 1) == units(an, "p.w", 0)
    gq = group_of(an, "q.w", 0)  # q and a are added: one group, consumed by r, free
    assert gq.prunable and units(an, "a.w", 0) == units(an, "q.w", 0) == units(an, "r.w", 1)

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kq = kept(o["q.w"], p["q.w"], 0)
    assert len(kq) == 3 and kept(o["a.w"], p["a.w"], 0) == kq == kept(o["r.w"], p["r.w"], 1)
    assert p["p.w"].shape == o["p.w"].shape
