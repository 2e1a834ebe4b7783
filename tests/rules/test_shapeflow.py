"""Run-time shape values (graphprune/shapeflow.py): a channel count read at run time is accepted
where it lands on exactly those channels and blocks wherever else it is used.

`normalize` folds every static dim into a constant, so these graphs are analysed raw (as a model whose
shapes only exist at run time would be); the real TorchScript exports in the zoo cover the rest.
"""

from __future__ import annotations

import onnx
from rules.helpers import Net

from graphprune.depgraph import DependencyGraph
from graphprune.groups import Group, Grouping, build_groups
from graphprune.inputs import signature
from graphprune.reasons import BlockKind
from graphprune.shapes import resolve_shapes


def _raw(model: onnx.ModelProto) -> tuple[DependencyGraph, Grouping]:
    graph = DependencyGraph.build(model, resolve_shapes(model, signature(model)))
    return graph, build_groups(graph)


def _group(graph: DependencyGraph, grouping: Grouping, tensor: str, axis: int) -> tuple[list[int], Group]:
    roots = grouping.roots[graph.tracked(tensor)[axis]]
    gid = grouping.unit_group[int(roots[0])][0]
    return [grouping.unit_group[int(r)][1] for r in roots], grouping.groups[gid]


def _attention(n: Net, head_dim: str | None) -> None:
    """q[N,4,8] split into heads with a run-time target, merged back with Shape(q)[0:3]."""
    x = n.input("x", ["N", 4, 8])
    q = n.op("MatMul", [x, n.w("wq", [8, 8])], name="q")
    shape = n.op("Shape", [q], name="shape")
    lead = n.op("Slice", [shape, n.const("s0", [0]), n.const("s2", [2])], name="lead")
    if head_dim is None:  # [N, T, -1, 2]: heads of 2
        target = n.op("Concat", [lead, n.const("rest", [-1, 2])], name="target", axis=0)
    else:  # [N, T, 4, hidden/4]: head_dim read from the channel count
        target = n.op("Concat", [lead, n.const("heads", [4]), head_dim], name="target", axis=0)
    split = n.op("Reshape", [q, target], name="split")
    merge = n.op("Slice", [n.op("Shape", [q], name="shape_q"), n.const("m0", [0]), n.const("m3", [3])], name="m")
    merged = n.op("Reshape", [split, merge], name="merged")
    n.output(n.op("MatMul", [merged, n.w("wo", [8, 3])], name="out"), shape=["N", 4, 3])


def test_channel_count_read_where_the_channels_land_is_accepted() -> None:
    n = Net()
    _attention(n, None)
    graph, grouping = _raw(n.model())
    units, group = _group(graph, grouping, "wq", 1)
    assert units == [0, 0, 1, 1, 2, 2, 3, 3]  # heads of 2; merge target Shape(q)[2] shrinks with them
    assert group.prunable and not group.reasons


def test_head_dim_computed_from_the_channel_count_blocks() -> None:
    n = Net()
    x = n.input("x", ["N", 4, 8])
    q = n.op("MatMul", [x, n.w("wq", [8, 8])], name="q")
    channels = n.op("Gather", [n.op("Shape", [q], name="shape"), n.const("i2", [2])], name="channels")
    head_dim = n.op("Div", [channels, n.const("four", 4)], name="head_dim")  # hidden / heads
    target = n.op("Concat", [n.const("lead", [0, 0, 4]), head_dim], name="target", axis=0)
    split = n.op("Reshape", [q, target], name="split")
    merged = n.op("Reshape", [split, n.const("back", [0, 0, 8])], name="merged")
    n.output(n.op("MatMul", [merged, n.w("wo", [8, 3])], name="out"), shape=["N", 4, 3])
    graph, grouping = _raw(n.model())
    _, group = _group(graph, grouping, "wq", 1)
    assert not group.prunable
    assert {r.kind for r in group.reasons} == {BlockKind.SHAPE_NOT_REWRITABLE}


def test_arithmetic_on_a_channel_count_blocks() -> None:
    n = Net()
    h = n.op("MatMul", [n.input("x", ["N", 8]), n.w("w1", [8, 6])], name="h")
    count = n.op("Cast", [n.op("Gather", [n.op("Shape", [h], name="shape"), n.const("i1", 1)], name="c")], to=1)
    scaled = n.op("Div", [h, count], name="mean_like")
    n.output(n.op("MatMul", [scaled, n.w("w2", [6, 3])], name="out"), shape=["N", 3])
    graph, grouping = _raw(n.model())
    _, group = _group(graph, grouping, "w1", 1)
    assert {r.kind for r in group.reasons} == {BlockKind.SHAPE_NOT_REWRITABLE}


def test_torch_expand_minus_one_lowering_follows_the_heads() -> None:
    """expand(-1, -1, n_rep, -1) exports as Where(Equal(shape, -1), ones, shape) -> Expand (GQA)."""
    n = Net()
    k = n.op("MatMul", [n.input("x", ["N", 8]), n.w("wk", [8, 4])], name="k")  # 2 kv heads of 2
    heads = n.op("Reshape", [k, n.const("kv", [0, 2, 1, 2])], name="heads")  # [N, 2, 1, 2]
    shape = n.op("Shape", [heads], name="shape")
    want = n.op("Concat", [n.op("Slice", [shape, n.const("a", [0]), n.const("b", [2])], name="lead"),
                           n.const("rep", [3]), n.op("Slice", [shape, n.const("c", [3]), n.const("d", [4])],
                                                     name="tail")], name="want", axis=0)
    is_minus = n.op("Equal", [want, n.const("minus", [-1, -1, -1, -1])], name="is_minus")
    target = n.op("Where", [is_minus, n.const("ones", [1, 1, 1, 1]), want], name="target")
    expanded = n.op("Expand", [heads, target], name="expanded")  # [N, 2, 3, 2]
    flat = n.op("Reshape", [expanded, n.const("to_flat", [0, 12])], name="flat")
    n.output(n.op("MatMul", [flat, n.w("wo", [12, 3])], name="out"), shape=["N", 3])
    graph, grouping = _raw(n.model())
    units, group = _group(graph, grouping, "wk", 1)
    assert units == [0, 0, 1, 1]
    assert group.prunable and not group.reasons, [str(r) for r in group.reasons]
