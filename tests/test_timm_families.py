"""timm families that used to be blocked (tests/zoo.py builds them small, random weights):
split attention over radix slots (ResNeSt, SKNet) in exact mode, GroupNorm(1) exported as
Reshape -> InstanceNormalization -> Reshape (PoolFormer) and ConvNeXt-V2's GRN approximately."""

from __future__ import annotations

import onnx
import pytest
from zoo_testing import params_removed, path_or_skip

import graphprune
from graphprune.reasons import BlockKind

pytestmark = pytest.mark.slow  # timm exports


@pytest.mark.parametrize("name", ["timm_resnest-ts", "timm_resnest-dynamo", "timm_skresnet-ts",
                                  "timm_skresnet-dynamo"])
def test_split_attention_prunes_the_channels_inside_every_radix_slot(name: str) -> None:
    path = path_or_skip(name)
    an = graphprune.analyze(path)
    blocked = [g for g in an.grouping.groups if not g.prunable]
    assert [r.kind for g in blocked for r in g.reasons] == [BlockKind.GRAPH_OUTPUT]  # only the logits
    res = graphprune.prune(path, {"sparsity": 0.3, "latency_runs": 0})
    assert params_removed(res) > 0.45  # 25.6% (ResNeSt) and 29.6% (SKNet) when Softmax over the slots blocked
    assert res.report.validation["equivalence"]["passed"]


@pytest.mark.parametrize(("name", "least"), [("timm_poolformer-ts", 0.45), ("timm_poolformer-dynamo", 0.3),
                                             ("timm_convnextv2-ts", 0.3), ("timm_convnextv2-dynamo", 0.3)])
def test_groupnorm_and_grn_widths_go_approximately(name: str, least: float) -> None:
    path = path_or_skip(name)
    try:
        exact = params_removed(graphprune.prune(path, {"sparsity": 0.3, "latency_runs": 0}))
    except graphprune.TargetImpossibleError:
        exact = 0.0  # ConvNeXt-V2: GRN's mean over channels fixes every MLP width
    approx = graphprune.prune(path, {"sparsity": 0.3, "latency_runs": 0, "approximate_norms": True})
    assert exact < 0.2 and params_removed(approx) >= least
    ops = {r["op"] for g in approx.report.groups["pruned_list"] for r in g.get("approximate", [])}
    assert ops >= ({"InstanceNormalization"} if "poolformer" in name else {"ReduceMean"})
    onnx.checker.check_model(approx.model, full_check=True)
    (out,) = approx.report.validation["outputs"]
    assert 0.9 < out["cosine"] < 1.0  # measured, not exact
