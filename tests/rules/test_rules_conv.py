"""Conv and ConvTranspose: plain (1D/2D/3D), depthwise with a channel multiplier, grouped."""

from __future__ import annotations

import pytest
from rules.helpers import (
    Net,
    arrays,
    group_of,
    kept,
    kinds,
    params,
    pruned,
    repeat_each,
    unit_index,
    units,
)

import graphprune
from graphprune.onnxutil import attr
from graphprune.reasons import BlockKind


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_chain_couples_rows_bias_and_next_columns(dims: int) -> None:
    n = Net()
    y = n.conv(n.input("x", [1, 3, *[4] * dims]), 3, 8, "p", k=3, dims=dims)
    y = n.conv(n.op("Relu", [y]), 8, 5, "q", k=3, dims=dims)
    n.output(y)
    m = n.model()
    an = graphprune.analyze(m)

    g = group_of(an, "p.w", 0)
    assert g.size == 8 and g.prunable and not g.reasons
    assert params(g) == {("p.w", 0, "out"), ("p.b", 0, "bias"), ("q.w", 1, "in")}
    assert unit_index(an, "p.w", 0) == list(range(8))
    assert units(an, "q.w", 1) == units(an, "p.b", 0) == units(an, "p.w", 0)
    assert 1 not in an.graph.tracked("p.w") and an.graph.tracked("x") == {}
    out = group_of(an, "q.w", 0)
    assert params(out) == {("q.w", 0, "out"), ("q.b", 0, "bias")}
    assert not out.prunable and kinds(out) == {BlockKind.GRAPH_OUTPUT}

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    assert len(kp) == 4
    assert kept(o["p.b"], p["p.b"], 0) == kp
    assert kept(o["q.w"], p["q.w"], 1) == kp
    assert p["q.w"].shape[0] == 5 and p["q.b"].shape == (5,)


# (op, group, channels in, channels out): the middle conv 'm' between producer 'p' and consumer 'q'
GROUPED = {
    "depthwise": ("Conv", 4, 4, 4),
    "depthwise_x2": ("Conv", 4, 4, 8),
    "grouped": ("Conv", 4, 8, 12),  # four narrow groups (2 inputs each)
    "deconv_depthwise_x2": ("ConvTranspose", 4, 4, 8),
    "deconv_grouped": ("ConvTranspose", 2, 8, 6),
}


@pytest.mark.parametrize("case", GROUPED)
def test_grouped_conv_loses_whole_groups(case: str) -> None:
    op, group, cin, cout = GROUPED[case]
    n = Net()
    y = n.conv(n.input("x", [1, 3, 4, 4]), 3, cin, "p")
    y = n.conv(y, cin, cout, "m", k=3, group=group, op=op)
    n.output(n.conv(y, cout, 3, "q"))
    m = n.model()
    an = graphprune.analyze(m)

    per_in, per_out = cin // group, cout // group
    g = group_of(an, "p.w", 0)
    assert g.size == group and g.prunable
    # a group's input channels are one unit; its output channels follow that unit
    assert unit_index(an, "p.w", 0) == repeat_each(range(group), per_in)
    heads = units(an, "p.w", 0)[::per_in]
    assert units(an, "m.b", 0) == units(an, "q.w", 1) == repeat_each(heads, per_out)
    if op == "Conv":
        assert units(an, "m.w", 0) == repeat_each(heads, per_out)
        assert params(g) == {("p.w", 0, "out"), ("p.b", 0, "bias"), ("m.w", 0, "out"), ("m.b", 0, "bias"),
                             ("q.w", 1, "in")}
    else:
        assert units(an, "m.w", 0) == units(an, "p.w", 0)
        assert params(g) == {("p.w", 0, "out"), ("p.b", 0, "bias"), ("m.w", 0, "in"), ("m.b", 0, "bias"),
                             ("q.w", 1, "in")}
    assert 1 not in an.graph.tracked("m.w")  # per-group width never changes

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    kept_groups = sorted({c // per_in for c in kp})
    assert len(kept_groups) == group - group // 2
    assert kp == [c for c in range(cin) if c // per_in in kept_groups]
    k_out = [c for c in range(cout) if c // per_out in kept_groups]
    assert kept(o["m.b"], p["m.b"], 0) == k_out
    assert kept(o["m.w"], p["m.w"], 0) == (k_out if op == "Conv" else kp)
    assert kept(o["q.w"], p["q.w"], 1) == k_out
    node = next(nd for nd in res.model.graph.node if nd.op_type == op and nd.input[1] == "m.w")
    assert attr(node, "group") == len(kept_groups)


def test_few_wide_groups_lose_the_same_positions_in_every_group() -> None:
    """Two groups of 4 inputs (ResNeSt's radix slots): position i of both groups is one unit."""
    n = Net()
    y = n.conv(n.input("x", [1, 3, 4, 4]), 3, 8, "p")
    y = n.conv(y, 8, 6, "m", k=3, group=2)
    n.output(n.conv(y, 6, 3, "q"))
    m = n.model()
    an = graphprune.analyze(m)

    assert unit_index(an, "p.w", 0) == [0, 1, 2, 3] * 2
    assert units(an, "m.w", 1) == units(an, "p.w", 0)[:4]
    assert units(an, "m.w", 0) == units(an, "m.b", 0) == units(an, "q.w", 1) == units(an, "m.w", 0)[:3] * 2
    assert group_of(an, "p.w", 0).size == 4 and group_of(an, "m.w", 0).size == 3

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    within_in = [c for c in kp if c < 4]
    assert kp == within_in + [c + 4 for c in within_in] and 0 < len(within_in) < 4
    km = kept(o["m.w"], p["m.w"], 0, axis1=within_in)
    within_out = [c for c in km if c < 3]
    assert km == within_out + [c + 3 for c in within_out] and 0 < len(within_out) < 3
    assert kept(o["m.w"], p["m.w"], 1, axis0=km) == within_in
    node = next(nd for nd in res.model.graph.node if nd.op_type == "Conv" and nd.input[1] == "m.w")
    assert attr(node, "group") == 2


def test_conv_transpose_group1_is_consumer_and_producer() -> None:
    n = Net()
    y = n.conv(n.input("x", [1, 3, 4, 4]), 3, 4, "p")
    y = n.conv(y, 4, 6, "m", k=3, op="ConvTranspose")
    n.output(n.conv(y, 6, 3, "q"))
    m = n.model()
    an = graphprune.analyze(m)

    gp, gm = group_of(an, "p.w", 0), group_of(an, "m.w", 1)
    assert gp.id != gm.id and gp.size == 4 and gm.size == 6 and gp.prunable and gm.prunable
    assert units(an, "m.w", 0) == units(an, "p.w", 0)
    assert units(an, "q.w", 1) == units(an, "m.b", 0) == units(an, "m.w", 1)
    assert params(gp) == {("p.w", 0, "out"), ("p.b", 0, "bias"), ("m.w", 0, "in")}
    assert params(gm) == {("m.w", 1, "out"), ("m.b", 0, "bias"), ("q.w", 1, "in")}

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp, km = kept(o["p.w"], p["p.w"], 0), kept(o["m.b"], p["m.b"], 0)
    assert (len(kp), len(km)) == (2, 3)
    assert kept(o["m.w"], p["m.w"], 0, axis1=km) == kp
    assert kept(o["m.w"], p["m.w"], 1, axis0=kp) == km
    assert kept(o["q.w"], p["q.w"], 1) == km


def test_grouped_conv_on_fixed_input_tracks_nothing() -> None:
    n = Net()
    y = n.conv(n.input("x", [1, 4, 4, 4]), 4, 8, "m", group=2)
    n.output(n.conv(y, 8, 3, "q"))
    an = graphprune.analyze(n.model())
    assert an.graph.tracked("m.w") == {} and an.graph.tracked("m") == {}
    assert set(an.graph.tracked("q.w")) == {0}  # q's input channels are fixed: only its rows


@pytest.mark.parametrize("group", [12, 3])
def test_grouped_conv_over_a_concat_of_two_producers(group: int) -> None:
    """Concat(a: 6, b: 6) -> conv with `group` groups. Depthwise (12) keeps a and b apart; 3 groups of
    4 lose the same positions in every group: a0 a4 b2, a1 a5 b3, a2 b0 b4, a3 b1 b5 are the four units,
    one group of a and b."""
    n = Net()
    x = n.input("x", [1, 3, 4, 4])
    y = n.op("Concat", [n.conv(x, 3, 6, "a"), n.conv(x, 3, 6, "b")], axis=1)
    n.output(n.conv(n.conv(y, 12, 12, "m", k=3, group=group), 12, 3, "q"))
    m = n.model()
    an = graphprune.analyze(m)

    ua, ub = units(an, "a.w", 0), units(an, "b.w", 0)
    assert units(an, "m.w", 0) == units(an, "q.w", 1) == (ua + ub if group == 12 else units(an, "m.w", 0)[:4] * 3)
    if group == 12:
        assert group_of(an, "a.w", 0).id != group_of(an, "b.w", 0).id
        assert (group_of(an, "a.w", 0).size, group_of(an, "b.w", 0).size) == (6, 6)
    else:
        assert unit_index(an, "m.w", 0) == [0, 1, 2, 3] * 3 and group_of(an, "a.w", 0).size == 4
        assert group_of(an, "b.w", 0).id == group_of(an, "a.w", 0).id

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    ka, kb = kept(o["a.w"], p["a.w"], 0), kept(o["b.w"], p["b.w"], 0)
    kin = [*ka, *(6 + i for i in kb)]
    node = next(nd for nd in res.model.graph.node if nd.name == "m")
    if group == 3:
        within = [c for c in kin if c < 4]
        assert kin == [c + 4 * r for r in range(3) for c in within] and len(within) == 2
        km = kept(o["m.w"], p["m.w"], 0, axis1=within)
        assert km == [c + 4 * r for r in range(3) for c in km if c < 4] == kept(o["q.w"], p["q.w"], 1)
        assert attr(node, "group") == 3
    else:
        assert kept(o["m.w"], p["m.w"], 0) == kin == kept(o["q.w"], p["q.w"], 1)
        assert len(ka) == len(kb) == 3 and attr(node, "group") == len(kin)


def test_concat_of_a_tensor_with_itself_repeats_its_units() -> None:
    n = Net()
    y = n.conv(n.input("x", [1, 3, 4, 4]), 3, 4, "p")
    n.output(n.conv(n.op("Concat", [y, y], axis=1), 8, 3, "q"))
    m = n.model()
    an = graphprune.analyze(m)
    assert units(an, "q.w", 1) == units(an, "p.w", 0) * 2

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    assert len(kp) == 2 and kept(o["q.w"], p["q.w"], 1) == [*kp, *(4 + i for i in kp)]
