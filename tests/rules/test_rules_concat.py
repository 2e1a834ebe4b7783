"""Concat, Split and Slice: positions land at their offsets; sizes and bounds are rewritten."""

from __future__ import annotations

import numpy as np
import pytest
from rules.helpers import (
    Net,
    arrays,
    group_of,
    kept,
    kinds,
    params,
    pruned,
    sandwich,
    units,
)

import graphprune
from graphprune.onnxutil import attr
from graphprune.reasons import BlockKind

INT64_MAX = 2**63 - 1


def test_concat_on_channels_keeps_each_producer_at_its_offset() -> None:
    n = Net()
    x = n.input("x", [1, 3, 4, 4])
    a, b = n.conv(x, 3, 3, "a"), n.conv(x, 3, 5, "b")
    n.output(n.conv(n.op("Concat", [a, b], axis=1), 8, 4, "q"))
    m = n.model()
    an = graphprune.analyze(m)

    ga, gb = group_of(an, "a.w", 0), group_of(an, "b.w", 0)
    assert ga.id != gb.id and (ga.size, gb.size) == (3, 5) and ga.prunable and gb.prunable
    assert units(an, "q.w", 1) == units(an, "a.w", 0) + units(an, "b.w", 0)
    assert params(ga) == {("a.w", 0, "out"), ("a.b", 0, "bias"), ("q.w", 1, "in")}
    assert params(gb) == {("b.w", 0, "out"), ("b.b", 0, "bias"), ("q.w", 1, "in")}
    q_a = next(mb for mb in ga.members if mb.tensor == "q.w")
    q_b = next(mb for mb in gb.members if mb.tensor == "q.w")
    assert q_a.positions.tolist() == [0, 1, 2] and q_b.positions.tolist() == [3, 4, 5, 6, 7]

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    ka, kb = kept(o["a.w"], p["a.w"], 0), kept(o["b.w"], p["b.w"], 0)
    assert (len(ka), len(kb)) == (2, 3)
    assert kept(o["q.w"], p["q.w"], 1) == ka + [3 + i for i in kb]


def test_concat_on_another_axis_couples_the_producers() -> None:
    n = Net()
    x = n.input("x", [1, 3, 4, 4])
    a, b = n.conv(x, 3, 6, "a"), n.conv(x, 3, 6, "b")
    n.output(n.conv(n.op("Concat", [a, b], axis=2), 6, 4, "q"))
    m = n.model()
    an = graphprune.analyze(m)

    assert units(an, "a.w", 0) == units(an, "b.w", 0) == units(an, "q.w", 1)
    assert group_of(an, "a.w", 0).size == 6

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    ka = kept(o["a.w"], p["a.w"], 0)
    assert len(ka) == 3 and kept(o["b.w"], p["b.w"], 0) == ka == kept(o["q.w"], p["q.w"], 1)


def test_concat_with_a_fixed_input_blocks_only_its_positions() -> None:
    n = Net()
    a = n.conv(n.input("x", [1, 3, 4, 4]), 3, 6, "a")
    n.output(n.conv(n.op("Concat", [a, n.input("x2", [1, 2, 4, 4])], axis=1), 8, 4, "q"))
    m = n.model()
    an = graphprune.analyze(m)

    ga = group_of(an, "a.w", 0)
    fixed = group_of(an, "q.w", 1, 6)
    assert units(an, "q.w", 1)[:6] == units(an, "a.w", 0) and ga.prunable
    assert fixed.id != ga.id and fixed.size == 2 and not fixed.prunable
    assert kinds(fixed) == {BlockKind.FIXED_OPERAND}

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    ka = kept(o["a.w"], p["a.w"], 0)
    assert len(ka) == 3 and kept(o["q.w"], p["q.w"], 1) == [*ka, 6, 7]


def _split_sizes(model: graphprune.PruneResult, node_name: str) -> list[int]:
    node = next(nd for nd in model.model.graph.node if nd.name == node_name)
    if len(node.input) > 1 and node.input[1]:
        return arrays(model.model)[node.input[1]].tolist()
    return list(attr(node, "split"))


# opset, how the sizes are given, the sizes
SPLITS = {
    "input_13": (13, "input", [2, 6]),
    "attribute_11": (11, "attribute", [2, 6]),
    "even_default_17": (17, "none", [4, 4]),
    "num_outputs_18": (18, "num_outputs", [4, 4]),
}


@pytest.mark.parametrize("case", SPLITS)
def test_split_hands_each_output_its_positions(case: str) -> None:
    opset, how, sizes = SPLITS[case]
    n = Net(opset)
    y = n.conv(n.input("x", [1, 3, 4, 4]), 3, 8, "p")
    ins, kw = [y], {}
    if how == "input":
        ins.append(n.const("sizes", sizes))
    elif how == "attribute":
        kw["split"] = sizes
    elif how == "num_outputs":
        kw["num_outputs"] = 2
    s0, s1 = n.op("Split", ins, outputs=2, name="split", axis=1, **kw)
    n.output(n.conv(s0, sizes[0], 3, "q0"), n.conv(s1, sizes[1], 3, "q1"))
    m = n.model()
    an = graphprune.analyze(m)

    up = units(an, "p.w", 0)
    assert units(an, "q0.w", 1) == up[: sizes[0]] and units(an, "q1.w", 1) == up[sizes[0]:]
    g = group_of(an, "p.w", 0)
    assert g.size == 8 and g.prunable
    assert params(g) == {("p.w", 0, "out"), ("p.b", 0, "bias"), ("q0.w", 1, "in"), ("q1.w", 1, "in")}

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    k0 = [i for i in kp if i < sizes[0]]
    k1 = [i - sizes[0] for i in kp if i >= sizes[0]]
    # half is removed, except that no output may lose all its channels (one is then kept back)
    assert k0 and k1 and (len(kp) == 4 or (len(kp) == 5 and len(k0) == 1))
    assert kept(o["q0.w"], p["q0.w"], 1) == k0 and kept(o["q1.w"], p["q1.w"], 1) == k1
    assert _split_sizes(res, "split") == [len(k0), len(k1)]


def test_split_on_a_spatial_axis_passes_channels_to_every_output() -> None:
    n = Net(13)
    y = n.conv(n.input("x", [1, 3, 4, 4]), 3, 8, "p")
    s0, s1 = n.op("Split", [y, n.const("sizes", [1, 3])], outputs=2, name="split", axis=2)
    n.output(n.conv(s0, 8, 3, "q0"), n.conv(s1, 8, 3, "q1"))
    m = n.model()
    an = graphprune.analyze(m)
    assert units(an, "q0.w", 1) == units(an, "q1.w", 1) == units(an, "p.w", 0)

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    assert kept(o["q0.w"], p["q0.w"], 1) == kept(o["q1.w"], p["q1.w"], 1) == kp
    assert _split_sizes(res, "split") == [1, 3]


def _slice(opset: int, starts: list[int], ends: list[int], axes: list[int], steps: list[int] | None = None):
    def build(n: Net, y: str) -> str:
        if opset < 10:
            return n.op("Slice", [y], name="slice", starts=starts, ends=ends, axes=axes)
        ins = [y, n.const("starts", starts), n.const("ends", ends), n.const("axes", axes)]
        if steps:
            ins.append(n.const("steps", steps))
        return n.op("Slice", ins, name="slice")

    return build


# opset, starts, ends -> channels 2..6 of 8 in every case
SLICES = {
    "positive": (17, [2], [7]),
    "negative": (17, [-6], [-1]),
    "attributes_opset9": (9, [2], [7]),
}


@pytest.mark.parametrize("case", SLICES)
def test_slice_on_channels_keeps_the_sliced_positions(case: str) -> None:
    opset, starts, ends = SLICES[case]
    m = sandwich(_slice(opset, starts, ends, [1]), opset=opset, q_in=5)
    an = graphprune.analyze(m)
    assert units(an, "q.w", 1) == units(an, "p.w", 0)[2:7]
    assert group_of(an, "p.w", 0).size == 8

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    inside = [i - 2 for i in kp if 2 <= i < 7]
    assert inside and kept(o["q.w"], p["q.w"], 1) == inside
    node = next(nd for nd in res.model.graph.node if nd.name == "slice")
    if opset < 10:
        new_starts, new_ends = list(attr(node, "starts")), list(attr(node, "ends"))
    else:
        new_starts, new_ends = arrays(res.model)["starts"].tolist(), arrays(res.model)["ends"].tolist()
    assert new_starts == [sum(i < 2 for i in kp)] and new_ends == [sum(i < 7 for i in kp)]


def test_slice_to_the_end_of_the_channels() -> None:
    m = sandwich(_slice(17, [5], [INT64_MAX], [1]), q_in=3)
    an = graphprune.analyze(m)
    assert units(an, "q.w", 1) == units(an, "p.w", 0)[5:]
    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    assert kept(o["q.w"], p["q.w"], 1) == [i - 5 for i in kp if i >= 5]


def test_slice_on_a_spatial_axis_passes_channels() -> None:
    m = sandwich(_slice(17, [1], [3], [2]))
    an = graphprune.analyze(m)
    assert units(an, "q.w", 1) == units(an, "p.w", 0)
    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    assert kept(o["q.w"], p["q.w"], 1) == kept(o["p.w"], p["p.w"], 0)
    assert arrays(res.model)["starts"].tolist() == [1] and arrays(res.model)["ends"].tolist() == [3]


def test_strided_slice_on_channels_blocks() -> None:
    an = graphprune.analyze(sandwich(_slice(17, [0], [8], [1], [2]), q_in=4))
    g = group_of(an, "p.w", 0)
    assert not g.prunable and kinds(g) == {BlockKind.LAYOUT}
    assert np.all(g.blocked)


@pytest.mark.parametrize("entry", [1, 8])
def test_a_class_token_expanded_to_the_batch_is_sliced_with_the_tokens(entry: int) -> None:
    """ViT: concat(cls_token.expand(B, -1, -1), patches) on the token axis; the token's channels are the
    patches' (the Expand's shape entry on them is 1, or the width, rewritten)."""
    n = Net()
    x = n.input("x", ["B", 4, 6])
    patches = n.op("MatMul", [x, n.w("p", [6, 8])])
    batch = n.op("Unsqueeze", [n.op("Gather", [n.op("Shape", [x]), n.const("zero", 0)]), n.const("ax", [0])])
    to = n.op("Concat", [batch, n.const("rest", [1, entry])], axis=0)
    cls = n.op("Expand", [n.w("cls", [1, 1, 8]), to], name="expand")
    tokens = n.op("Concat", [cls, patches], axis=1)
    n.output(n.op("MatMul", [tokens, n.w("q", [8, 3])]), shape=["B", 5, 3])
    m = n.model()
    an = graphprune.analyze(m, input_shapes={"x": [2, 4, 6]})
    assert units(an, "cls", 2) == units(an, "p", 1) == units(an, "q", 0)
    res = pruned(m, input_shapes={"x": [2, 4, 6]})
    o, p = arrays(m), arrays(res.model)
    assert kept(o["cls"], p["cls"], 2) == kept(o["p"], p["p"], 1) == kept(o["q"], p["q"], 0)
    assert p["rest"].tolist() == [1, 1 if entry == 1 else p["p"].shape[1]]
