"""Selection and importance on the bundled demo CNN: targets, caps, rounding, exclusions, criteria."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import graphprune
from graphprune.demo import demo_model
from graphprune.groups import Member
from graphprune.importance import L2, Lamp, group_scores
from graphprune.inputs import make_feeds, signature

MODEL = demo_model()


def _removed(res: graphprune.PruneResult) -> dict[tuple[str, ...], int]:
    return {tuple(g["producers"]): g["removed"] for g in res.report.groups["pruned_list"]}


def _run(model: object, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    return sess.run(None, {"input": x})[0]


def test_zero_sparsity_reproduces_outputs() -> None:
    res = graphprune.prune(MODEL, sparsity=0.0, latency_runs=0)
    x = make_feeds(signature(MODEL))["input"]
    np.testing.assert_allclose(_run(res.model, x), _run(MODEL, x), atol=1e-5, rtol=0)
    assert res.report.params["after"] == res.report.params["before"]


def test_local_ratio_per_group() -> None:
    res = graphprune.prune(MODEL, sparsity=0.5, latency_runs=0)
    assert _removed(res) == {("block_b", "se_expand", "stem"): 8, ("block_a",): 8, ("se_reduce",): 2,
                             ("project",): 12, ("fc1",): 32}


def test_round_to_keeps_multiples() -> None:
    res = graphprune.prune(MODEL, sparsity=0.3, round_to=4, latency_runs=0)
    for g in res.report.groups["pruned_list"]:
        kept = g["units"] - g["removed"]
        assert kept % 4 == 0 or kept == g["units"]


def test_cap_and_min_channels() -> None:
    res = graphprune.prune(MODEL, sparsity=0.8, max_group_sparsity=0.25, min_channels=14, latency_runs=0)
    for g in res.report.groups["pruned_list"]:
        assert g["removed"] <= math.floor(0.25 * g["units"])
        assert g["units"] - g["removed"] >= min(14, g["units"])


def test_exclude_by_glob() -> None:
    res = graphprune.prune(MODEL, sparsity=0.5, exclude=["fc1*"], latency_runs=0)
    assert ("fc1",) not in _removed(res)
    an = graphprune.analyze(MODEL, exclude=["fc1*"])
    fc1 = next(g for g in an.grouping.groups if g.producers == ["fc1"])
    assert not fc1.prunable and fc1.reasons[-1].kind.value == "excluded_by_user"


@pytest.mark.parametrize("target", ["params", "flops"])
@pytest.mark.parametrize("global_ranking", [False, True])
def test_cost_targets_are_reached_not_overshot(target: str, global_ranking: bool) -> None:
    res = graphprune.prune(MODEL, sparsity=0.4, target=target, global_ranking=global_ranking, latency_runs=0)
    d = res.report.params if target == "params" else res.report.flops
    reduction = 1 - d["after"] / d["before"]
    assert 0.4 - 0.005 <= reduction <= 0.5


def test_global_removes_lowest_scores_overall() -> None:
    res = graphprune.prune(MODEL, sparsity=0.3, global_ranking=True, latency_runs=0)
    total = sum(g.size for g in graphprune.analyze(MODEL).grouping.prunable)
    assert sum(_removed(res).values()) == int(0.3 * total)


def test_criteria_pick_different_channels() -> None:
    picks = {c: _removed(graphprune.prune(MODEL, sparsity=0.3, criterion=c, global_ranking=True,
                                          latency_runs=0, seed=1))
             for c in ("l1", "l2", "lamp", "random")}
    assert picks["random"] != picks["l2"]
    assert all(sum(p.values()) > 0 for p in picks.values())


def test_l2_scores_rank_by_group_norm() -> None:
    an = graphprune.analyze(MODEL)
    group = next(g for g in an.grouping.groups if g.producers == ["block_a"])
    scores = group_scores(an.graph, group, L2(), "sum", "none", np.random.default_rng(0))
    w_out = numpy_helper.to_array(next(t for t in an.model.graph.initializer if t.name == "block_a.w"))
    w_in = numpy_helper.to_array(next(t for t in an.model.graph.initializer if t.name == "block_b.w"))
    expected = (w_out**2).sum(axis=(1, 2, 3)) + (w_in**2).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_lamp_formula() -> None:
    weights = np.array([[3.0], [1.0], [2.0]])
    member = Member("w", 0, "out", np.arange(3), np.arange(3))
    s = Lamp().member_scores(weights, member, 3)
    np.testing.assert_allclose(s, [9 / 9, 1 / 14, 4 / 13])


def _all_in_if() -> object:
    """A model whose whole computation is the branches of an If (as some exporters wrap a dynamic
    path): two Conv chains with their weights inside the bodies."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)

    def body(tag: str) -> object:
        w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), f"{tag}_w1")
        w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), f"{tag}_w2")
        nodes = [helper.make_node("Conv", ["input", w1.name], [f"{tag}_a"], pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", [f"{tag}_a"], [f"{tag}_r"]),
                 helper.make_node("Conv", [f"{tag}_r", w2.name], [f"{tag}_y"])]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT,
                                                                                 [1, 4, 8, 8])], [w1, w2])

    nodes = [helper.make_node("ReduceSum", ["input"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["flag"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=body("then"), else_branch=body("else"), name="gate")]
    graph = helper.make_graph(nodes, "wrapped", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                               [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_a_graph_inside_control_flow_is_named_as_the_cause() -> None:
    model = _all_in_if()
    x = np.ones((1, 3, 8, 8), np.float32)
    assert _run(model, x).shape == (1, 4, 8, 8)  # a real, runnable model
    with pytest.raises(graphprune.TargetImpossibleError, match="the graph is control flow: 6 of its 9 nodes "
                                                               "are inside the bodies of If 'gate'"):
        graphprune.prune(model, {"sparsity": 0.3})
    assert any(w.startswith("the graph is control flow") for w in graphprune.analyze(model).warnings)  # inspect


def test_latency_advice_names_odd_widths_only_when_the_speed_up_is_measured_and_poor() -> None:
    from graphprune.api import latency_advice

    flops = {"before": 100, "after": 50}  # an ideal of 2x
    poor = {"before": 10.0, "after": 8.0, "noisy": False}  # 1.25x: 0.62 of the ideal
    advice = latency_advice(poor, flops, 1, [37, 64])
    assert advice is not None and "0.62 of the ideal" in advice and "e.g. 37" in advice
    assert "--round-to 8" in advice
    assert latency_advice(poor, flops, 8, [40, 64]) is None  # already rounded
    assert latency_advice(poor, flops, 1, [32, 64]) is None  # widths already fit the layout
    assert latency_advice({**poor, "noisy": True}, flops, 1, [37]) is None  # not a measurement to act on
    assert latency_advice({**poor, "after": 5.5}, flops, 1, [37]) is None  # 0.91 of the ideal
    assert latency_advice({"before": None, "after": None, "runs": 0}, flops, 1, [37]) is None


def test_rounded_local_ratios_step_one_group_at_a_time_toward_the_target() -> None:
    # at round-to 8 this net's 16-channel groups can only halve: no local ratio cuts between
    # 30% and 55% of the MACs; stepping one group at a time stops at the first plan that reaches -30%
    res = graphprune.prune(MODEL, sparsity=0.3, target="flops", round_to=8, latency_runs=0)
    reduction = 1 - res.report.flops["after"] / res.report.flops["before"]
    assert 0.3 <= reduction < 0.55
    an = graphprune.analyze(MODEL)
    uniform = graphprune.select.Selector(an.graph, an.grouping, {g.id: np.ones(g.size) for g in an.grouping.prunable},
                                         an.cost, graphprune.PruneConfig(round_to=8))
    local = [1 - an.cost.macs(uniform.local(r).removed_root) / an.cost.macs(None) for r in np.linspace(0, 1, 101)]
    assert not [x for x in local if 0.3 <= x < 0.55]
    for g in res.report.groups["pruned_list"]:
        assert (g["units"] - g["removed"]) % 8 == 0


def test_global_ranking_counts_only_the_units_whole_rounded_steps_remove() -> None:
    # ranked unit by unit, block_a's seven zero-score units came first and counted toward the 8 asked,
    # then rounding to 8 kept them (and fc1's one unit): the plan removed nothing. A step ranks by its
    # top unit, so block_a's first step (seven zeros and a 2) comes after fc1's (eight 1s)
    an = graphprune.analyze(MODEL)
    groups = {tuple(g.producers): g for g in an.grouping.prunable}
    scores = {g.id: np.full(g.size, 2.0) for g in an.grouping.prunable}
    block_a, fc1 = groups[("block_a",)], groups[("fc1",)]
    scores[block_a.id][:7] = 0.0
    scores[fc1.id][:8] = 1.0
    selector = graphprune.select.Selector(an.graph, an.grouping, scores, an.cost,
                                          graphprune.PruneConfig(round_to=8, global_ranking=True))
    plan = selector.global_(8)
    assert {gid: units.size for gid, units in plan.removed.items()} == {fc1.id: 8}
    assert sorted(plan.removed[fc1.id].tolist()) == list(range(8))
    assert {gid: units.size for gid, units in selector.global_(9).removed.items()}[fc1.id] == 8
