"""The differentiable view against onnxruntime on every real exported zoo model, and the write-back.

The view is what recovery trains; if it computed anything other than the ONNX graph, the trained
weights would be right for the wrong model. So every zoo model's outputs are compared with
onnxruntime on the recorded reference inputs, and the models it cannot run must say which op.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import zoo

pytest.importorskip("torch")
import torch

from graphprune import runtime
from graphprune.loading import load_model
from graphprune.normalize import normalize
from graphprune.recover.ops import Unsupported
from graphprune.recover.torchgraph import TorchGraph, weight_names, write_back
from graphprune.validate import equivalent

# ops the view does not implement, per model (each must be named in the refusal)
UNSUPPORTED = {"lstm-ts": "LSTM", "lstm-dynamo": "LSTM", "skl_mlp": "ai.onnx.ml.ArrayFeatureExtractor"}


def _params() -> list[Any]:
    return [pytest.param(n, marks=[pytest.mark.slow] if m.slow else []) for n, m in zoo.MODELS.items()]


def _model(name: str) -> onnx.ModelProto:
    try:
        return normalize(load_model(str(zoo.path(name))), copy=False)
    except zoo.ZooUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", _params())
def test_view_computes_what_onnxruntime_computes(name: str) -> None:
    model = _model(name)
    if name in UNSUPPORTED:
        with pytest.raises(Unsupported, match=UNSUPPORTED[name].replace(".", r"\.")):
            TorchGraph(model, weight_names(model))
        return
    feeds = dict(zoo.reference(name).inputs)
    view = TorchGraph(model, weight_names(model))
    with torch.no_grad():
        got = {k: v.numpy() for k, v in view({k: torch.from_numpy(v) for k, v in feeds.items()}).items()}
    ref = runtime.run(runtime.session(model), feeds)
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key].shape == value.shape, key
    ok, worst = equivalent(ref, got)
    assert ok, f"{name}: the view differs from onnxruntime by {worst:.3g}"
    assert worst < 1e-4


def test_weights_are_learned_tensors_only() -> None:
    """Conv/Gemm weights, biases and norm scales train; Clip bounds, Reshape shapes and scalars do not."""
    model = _model("mobilenetv2_tiny-ts")
    names = set(weight_names(model))
    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert all(n.input[1] in names for n in convs)
    clips = [i for n in model.graph.node if n.op_type == "Clip" for i in n.input[1:] if i in inits]
    assert clips and not names & set(clips)
    assert all(inits[n].data_type == onnx.TensorProto.FLOAT for n in names)


@pytest.mark.parametrize("name", ["resnet_tiny-ts", "hf_bert-dynamo", "skl_mlp_reg"])
def test_write_back_of_untouched_weights_is_byte_identical(name: str) -> None:
    """Only initializer values may change, and writing back unchanged values changes no byte: the
    storage field (raw_data or float_data), dims, names and order are kept."""
    model = _model(name)
    view = TorchGraph(model, weight_names(model))
    assert view.names
    assert write_back(model, view.values()).SerializeToString() == model.SerializeToString()


def test_write_back_changes_only_the_given_initializers() -> None:
    model = _model("cnn-ts")
    view = TorchGraph(model, weight_names(model))
    values = view.values()
    name = view.names[0]
    values[name] = values[name] + 1.0
    out = write_back(model, values)
    before = {t.name: t for t in model.graph.initializer}
    for t in out.graph.initializer:
        same = t.SerializeToString() == before[t.name].SerializeToString()
        assert same == (t.name != name), t.name
    assert out.graph.node == model.graph.node
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == name)),
                                  onnx.numpy_helper.to_array(before[name]) + 1.0)
    with pytest.raises(ValueError, match="dims"):
        write_back(model, {name: values[name].ravel()})
