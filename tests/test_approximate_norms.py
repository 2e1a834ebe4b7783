"""approximate_norms: channels go through cross-channel normalizations (LayerNorm, RMSNorm's ReduceMean),
which then see fewer channels. Opt-in, reported per group and measured; off, nothing changes."""

from __future__ import annotations

import onnx
import pytest
from zoo_testing import params_removed, path_or_skip

import graphprune

# (zoo model, the norm its stream goes through): LayerNorm (ViT, GPT-2, ConvNeXt's channels-last LN),
# RMSNorm decomposed into ReduceMean (Llama)
# the TorchScript ViTs expand their class token to the run-time batch (rules/common.py follows it)
CASES = [("hf_vit-dynamo", "LayerNormalization"), ("hf_vit-ts", "LayerNormalization"),
         ("tiny_vit-ts", "LayerNormalization"), ("hf_gpt2-dynamo", "LayerNormalization"),
         ("hf_convnext-dynamo", "LayerNormalization"), ("hf_bert_cls-ts", "LayerNormalization"),
         ("hf_bert_cls-dynamo", "LayerNormalization"), ("hf_llama-dynamo", "ReduceMean")]


@pytest.mark.parametrize(("name", "op"), CASES)
def test_the_residual_width_goes_approximately_and_says_so(name: str, op: str) -> None:
    path = path_or_skip(name)
    exact = graphprune.prune(path, {"sparsity": 0.3, "latency_runs": 0})
    approx = graphprune.prune(path, {"sparsity": 0.3, "latency_runs": 0, "approximate_norms": True})
    assert params_removed(exact) < 0.2 <= 0.3 <= params_removed(approx)
    assert exact.report.validation["equivalence"]["passed"] and "skipped" in approx.report.validation["equivalence"]
    flagged = [g for g in approx.report.groups["pruned_list"] if "approximate" in g]
    assert flagged and all(r["op"] == op for g in flagged for r in g["approximate"])
    assert not any("approximate" in g for g in exact.report.groups["pruned_list"])
    assert any("cross-channel normalization" in w for w in approx.report.warnings)
    onnx.checker.check_model(approx.model, full_check=True)
    (out,) = approx.report.validation["outputs"]
    assert 0.7 < out["cosine"] <= 1.0 and out["max_rel_err"] > 1e-4  # measured, not exact (random weights)


def test_a_stream_that_reaches_a_graph_output_stays_even_approximately() -> None:
    path = path_or_skip("hf_bert-dynamo")  # last_hidden_state is the stream itself
    plain = graphprune.prune(path, {"sparsity": 0.3, "latency_runs": 0})
    approx = graphprune.prune(path, {"sparsity": 0.3, "latency_runs": 0, "approximate_norms": True})
    assert approx.report.params == plain.report.params
    assert not any("approximate" in g for g in approx.report.groups["pruned_list"])
