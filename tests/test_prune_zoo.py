"""The core invariants on every real exported model in the zoo.

Equivalence is checked independently of graphprune's own self-check: the original model with the
input columns of every consumer of the removed channels zeroed must give the pruned model's outputs.
Wrong coupling (channel indices sent to the wrong Split branch, a shared bias sliced twice) breaks it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo
from onnx import ModelProto, numpy_helper

import graphprune
from graphprune.inputs import make_feeds, signature


def _params() -> list[Any]:
    return [pytest.param(n, marks=[pytest.mark.slow] if m.slow else []) for n, m in zoo.MODELS.items()]


def _load(name: str) -> ModelProto:
    try:
        return onnx.load(str(zoo.path(name)))
    except zoo.ZooUnavailable as exc:
        pytest.skip(str(exc))


def _run(model: ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    m = ModelProto()
    m.CopyFrom(model)
    m.ir_version = min(m.ir_version, 10)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def _zero_consumer_columns(an: graphprune.Analysis, removed_root: np.ndarray) -> ModelProto:
    model = ModelProto()
    model.CopyFrom(an.model)
    roots = an.grouping.roots
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init).copy()
        touched = False
        for axis, labels in an.graph.tracked(init.name).items():
            if an.graph.roles.get((init.name, axis)) == "in":
                gone = removed_root[roots[labels]]
                if gone.any():
                    index = [slice(None)] * value.ndim
                    index[axis] = np.nonzero(gone)[0]
                    value[tuple(index)] = 0
                    touched = True
        if touched:
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return model


def _assert_close(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], rtol: float, atol: float) -> None:
    assert list(ref) == list(got)
    for name, r in ref.items():
        assert got[name].shape == r.shape, name
        scale = max(1.0, float(np.abs(r).max())) if r.size and np.issubdtype(r.dtype, np.floating) else 1.0
        np.testing.assert_allclose(got[name], r, rtol=0, atol=atol + rtol * scale, err_msg=name)


@pytest.mark.parametrize("name", _params())
def test_zero_prune_reproduces_outputs(name: str) -> None:
    original = _load(name)
    res = graphprune.prune(original, sparsity=0.0, latency_runs=0)
    feeds = make_feeds(signature(original), seed=3)
    _assert_close(_run(original, feeds), _run(res.model, feeds), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", _params())
def test_30_percent_prune_equals_zeroed_original(name: str) -> None:
    original = _load(name)
    an = graphprune.analyze(original)
    if not an.grouping.prunable:
        with pytest.raises(graphprune.TargetImpossibleError):
            graphprune.prune(original, sparsity=0.3, latency_runs=0)
        return
    res = graphprune.prune(original, sparsity=0.3, latency_runs=0, compensate="none")
    onnx.checker.check_model(res.model, full_check=True)
    assert res.report.params["after"] < res.report.params["before"]
    assert res.report.validation["equivalence"]["passed"]
    assert [o.name for o in res.model.graph.output] == [o.name for o in original.graph.output]
    assert [i.name for i in res.model.graph.input] == [i.name for i in an.model.graph.input]
    feeds = make_feeds(signature(original), seed=5)
    reference = _zero_consumer_columns(an, res.plan.removed_root)
    _assert_close(_run(reference, feeds), _run(res.model, feeds), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", _params())
def test_obs_compensation_keeps_a_valid_model_and_helps_on_held_out_inputs(name: str) -> None:
    original = _load(name)
    if not graphprune.analyze(original).grouping.prunable:
        pytest.skip("nothing prunable")
    res = graphprune.prune(original, sparsity=0.3, latency_runs=0, compensate="obs", samples=16)
    comp = res.report.compensation
    assert res.report.validation["equivalence"]["passed"]  # checked on the uncompensated model
    if comp["method"] == "obs":
        check = comp["self_check"]
        kept_better = check["relative_error_compensated"] <= check["relative_error_uncompensated"]
        assert comp["applied"] == kept_better
        assert all(np.isfinite(layer["predicted_rel_error"]) for layer in comp["layers"])
