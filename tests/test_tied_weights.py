"""Shared weights (ALBERT runs one layer's weights in every layer; TorchScript stores a shared
Linear's weight once per use): one group spans every use, the copies stay equal, and the pruned
model stores each once, so it really is smaller by what the report says."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from zoo_testing import path_or_skip

import graphprune
from graphprune.loading import load_model
from graphprune.normalize import normalize, tied_families

pytestmark = pytest.mark.slow  # transformers exports


def _stored(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


@pytest.mark.parametrize("name", ["hf_albert-ts", "hf_albert-dynamo"])
def test_a_weight_shared_by_every_layer_is_pruned_once(name: str) -> None:
    path = path_or_skip(name)
    families = tied_families(normalize(load_model(path)).graph)
    assert len(families) >= 10  # every Linear of the one shared layer (and its duplicates)
    original = _stored(onnx.load(path))
    res = graphprune.prune(path, {"sparsity": 0.3, "latency_runs": 0})
    rep = res.report
    assert rep.validation["equivalence"]["passed"]
    assert rep.graph["shared_weights_tied"] >= len(families)
    assert _stored(res.model) == rep.params["after"]  # what the report says is what the file holds
    assert rep.params["after"] < 0.85 * rep.params["before"] <= 0.85 * original  # smaller, not regrown
    names = {t.name for t in res.model.graph.initializer}
    for family in families:
        assert family[0] in names and not names & set(family[1:])
    users = [i for n in res.model.graph.node for i in n.input if i == families[0][0]]
    assert len(users) >= 2  # still one tensor serving several layers


def test_a_fill_is_not_a_shared_weight() -> None:
    """Equal zeros or ones (fresh biases, norm scales) are separate parameters that happen to match."""
    path = path_or_skip("hf_albert-dynamo")
    graph = normalize(load_model(path)).graph
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for family in tied_families(graph):
        assert len(np.unique(values[family[0]])) > 1
