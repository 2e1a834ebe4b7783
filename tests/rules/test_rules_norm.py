"""GroupNorm fuses its groups into units; LayerNorm over the features of a sequence blocks them.
(BatchNorm/InstanceNorm and norms over other axes are in test_rules_passthrough.)"""

from __future__ import annotations

import numpy as np
import pytest
from rules.helpers import Net, arrays, group_of, kept, kinds, params, pruned, repeat_each, unit_index, units

import graphprune
from graphprune.onnxutil import attr
from graphprune.reasons import BlockKind


@pytest.mark.parametrize("opset", [18, 21])  # scale/bias per group (18) or per channel (21)
def test_groupnorm_loses_whole_groups(opset: int) -> None:
    n = Net(opset)
    y = n.conv(n.input("x", [1, 3, 4, 4]), 3, 8, "p")
    per = 2 if opset == 18 else 8
    y = n.op("GroupNormalization", [y, n.w("gn.s", [per]), n.w("gn.b", [per])], num_groups=2, name="gn")
    n.output(n.conv(y, 8, 3, "q"), shape=[1, 3, 4, 4])  # onnx cannot infer through the GroupNorm function
    m = n.model(check=opset != 18)  # onnx.checker refuses the deprecated GroupNormalization-18
    an = graphprune.analyze(m)

    g = group_of(an, "p.w", 0)
    assert g.size == 2 and g.prunable
    assert unit_index(an, "p.w", 0) == repeat_each(range(2), 4)
    assert units(an, "q.w", 1) == units(an, "p.w", 0)
    norm_units = units(an, "p.w", 0)[::4] if opset == 18 else units(an, "p.w", 0)
    assert units(an, "gn.s", 0) == units(an, "gn.b", 0) == norm_units
    assert params(g) == {("p.w", 0, "out"), ("p.b", 0, "bias"), ("gn.s", 0, "affine"), ("gn.b", 0, "bias"),
                         ("q.w", 1, "in")}
    # prune() validates with onnx.checker, which refuses GroupNormalization-18 itself
    res = pruned(m) if opset == 21 else graphprune.prune(m, sparsity=0.5, latency_runs=0, validate=False,
                                                          compensate="none")
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    assert kp in ([0, 1, 2, 3], [4, 5, 6, 7])
    assert kept(o["q.w"], p["q.w"], 1) == kp
    k_norm = kp if opset == 21 else [kp[0] // 4]
    assert kept(o["gn.s"], p["gn.s"], 0) == k_norm == kept(o["gn.b"], p["gn.b"], 0)
    node = next(nd for nd in res.model.graph.node if nd.name == "gn")
    assert attr(node, "num_groups") == 1


@pytest.mark.parametrize("axis", [-1, 2])
def test_layernorm_over_the_features_blocks(axis: int) -> None:
    """[B, T, 8] normalized over its last axis (axis -1, or 2 spelled out)."""
    n = Net()
    y = n.op("MatMul", [n.input("x", [2, 3, 6]), n.w("w1", [6, 8])])
    y = n.op("LayerNormalization", [y, n.w("ln.s", [8]), n.w("ln.b", [8])], axis=axis, name="ln")
    n.output(n.op("MatMul", [y, n.w("w2", [8, 5])]))
    m = n.model()
    an = graphprune.analyze(m)

    g = group_of(an, "w1", 1)
    assert g.size == 8 and not g.prunable and g.blocked.all()
    assert kinds(g) == {BlockKind.NORMALIZES_CHANNELS}
    assert [r.node for r in g.reasons] == ["ln"]
    assert an.graph.tracked("ln") == {} and 0 not in an.graph.tracked("w2")
    with pytest.raises(graphprune.TargetImpossibleError):
        graphprune.prune(m, sparsity=0.5, latency_runs=0)


def test_layernorm_over_time_passes_the_features() -> None:
    """[B, 8, T] (channels first) normalized over T only: the 8 features pass untouched."""
    n = Net()
    y = n.op("MatMul", [n.w("w1", [8, 6]), n.input("x", [2, 6, 3])])
    y = n.op("LayerNormalization", [y, n.w("ln.s", [3]), n.w("ln.b", [3])], axis=-1)
    n.output(n.op("MatMul", [n.w("w2", [5, 8]), y]))
    m = n.model()
    an = graphprune.analyze(m)

    g = group_of(an, "w1", 0)
    assert g.prunable and not g.reasons and units(an, "w2", 1) == units(an, "w1", 0)
    assert params(g) == {("w1", 0, "out"), ("w2", 1, "in")}

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    assert kept(o["w2"], p["w2"], 1) == kept(o["w1"], p["w1"], 0)
    assert p["ln.s"].shape == (3,)


@pytest.mark.parametrize("stats_are_outputs", [True, False])
def test_batchnorm_training_outputs_carry_the_channels(stats_are_outputs: bool) -> None:
    """Training mode adds running mean/var outputs of one value per channel: they follow the channels
    (and block them when they are graph outputs, which keep their shape)."""
    n = Net(15)
    y = n.conv(n.input("x", [2, 3, 4, 4]), 3, 8, "p")
    var = n.const("bn.var", np.linspace(0.5, 2.0, 8), np.float32)
    ins = [y, n.w("bn.s", [8]), n.w("bn.b", [8]), n.w("bn.mean", [8]), var]
    y, run_mean, run_var = n.op("BatchNormalization", ins, outputs=3, training_mode=1, name="bn")
    n.output(n.conv(y, 8, 3, "q"), *([run_mean, run_var] if stats_are_outputs else []))
    m = n.model()
    an = graphprune.analyze(m)

    g = group_of(an, "p.w", 0)
    assert units(an, run_mean, 0) == units(an, run_var, 0) == units(an, "q.w", 1) == units(an, "p.w", 0)
    assert ("bn.mean", 0, "stat") in params(g)
    if stats_are_outputs:
        assert not g.prunable and kinds(g) == {BlockKind.GRAPH_OUTPUT}
        return
    assert g.prunable
    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    kp = kept(o["p.w"], p["p.w"], 0)
    assert len(kp) == 4 and kept(o["bn.mean"], p["bn.mean"], 0) == kp == kept(o["q.w"], p["q.w"], 1)
