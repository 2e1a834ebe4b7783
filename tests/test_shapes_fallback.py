"""Shapes onnx's inference rejects fall back instead of making the model invalid, and an unknown shape
is a typed refusal naming the tensor, its node and the fix, or a block, never a traceback (issue 15)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import ModelProto, TensorProto, helper, numpy_helper

import graphprune
from graphprune import model as gp_model
from graphprune.depgraph import DependencyGraph
from graphprune.errors import InvalidModelError, UsageError
from graphprune.groups import build_groups
from graphprune.inputs import signature
from graphprune.normalize import normalize
from graphprune.reasons import BlockKind, ShapeUnknown
from graphprune.shapes import resolve_shapes

RNG = np.random.default_rng(0)


def _w(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _i64(name: str, values: list[int]) -> TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           inits: list[TensorProto], **graph: Any) -> ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits, **graph)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)  # onnxruntime: <= 13


def _run(model: ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def stale_softmax() -> ModelProto:
    """Conv -> Relu -> Conv -> Softmax whose output is declared [1, 4] (rank 2; it is [1, 4, 8, 8]),
    and a stale intermediate annotation too: onnxruntime runs it, strict inference refuses it."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["b"], pads=[1, 1, 1, 1], name="c2"),
             helper.make_node("Softmax", ["b"], ["y"], axis=1, name="sm")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                  [_w("w1", 8, 4, 3, 3), _w("w2", 4, 8, 3, 3)],
                  value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 8])])


def test_contradictory_declared_shapes_fall_back_to_inference_without_them() -> None:
    model = stale_softmax()
    with pytest.raises(onnx.shape_inference.InferenceError, match="Softmax"):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    (dense,) = _run(model, {"x": x})

    same = graphprune.prune(model, {"sparsity": 0.0})
    np.testing.assert_allclose(_run(same.model, {"x": x})[0], dense, rtol=1e-5, atol=1e-6)

    result = graphprune.prune(model, {"sparsity": 0.3})
    assert result.plan.removed
    assert any("declares" in w and "node name: sm" in w for w in result.report.warnings)  # the user is told
    onnx.checker.check_model(result.model, full_check=True)  # the declared output shape is the true one now
    assert [d.dim_value for d in result.model.graph.output[0].type.tensor_type.shape.dim] == [1, 4, 8, 8]
    assert _run(result.model, {"x": x})[0].shape == dense.shape

    normalized = normalize(model)
    shapes = resolve_shapes(normalized, signature(normalized))
    assert shapes["y"] == (1, 4, 8, 8)
    (warning,) = shapes.warnings
    assert "declares" in warning and "node name: sm" in warning


def test_a_model_onnx_rejects_but_onnxruntime_runs_gets_its_shapes_from_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnx's strict inference (stubbed: no real op is known that onnx rejects and onnxruntime runs
    once annotations are gone) rejects every Softmax: shapes come from one onnxruntime run."""
    strict = gp_model._strict

    def rejecting(view: ModelProto) -> ModelProto:
        if any(n.op_type == "Softmax" for n in view.graph.node):
            raise onnx.shape_inference.InferenceError("(op_type:Softmax, node name: sm): attribute rejected")
        return strict(view)

    monkeypatch.setattr(gp_model, "_strict", rejecting)
    model = stale_softmax()
    normalized = normalize(model)
    shapes = resolve_shapes(normalized, signature(normalized))
    assert shapes["a"] == (1, 8, 8, 8) and shapes["y"] == (1, 4, 8, 8)
    (warning,) = shapes.warnings
    assert "onnxruntime run" in warning and "node name: sm" in warning

    result = graphprune.prune(model, {"sparsity": 0.3})
    assert result.plan.removed
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert _run(result.model, {"x": x})[0].shape == (1, 4, 8, 8)


def test_a_model_neither_onnx_nor_onnxruntime_accepts_is_invalid() -> None:
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [_w("w", 5, 4)])
    with pytest.raises(InvalidModelError, match=r"(?s)'?proj'?.*onnxruntime cannot load") as info:
        graphprune.prune(model, {"sparsity": 0.3})
    assert info.value.exit_code == 3


def dynamic_reshape(size: str = "T") -> ModelProto:
    """x [N, T, 8] -> MatMul -> Relu -> MatMul -> Reshape to [N, -1, 3], its target computed at run time
    from Shape(x) (through Max, which neither onnx nor a load-time fold follows) -> Shape -> Expand:
    at the guessed T = 32 the reshape cannot be done."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["hr", "w2"], ["o"], name="fc2"),
             helper.make_node("Shape", ["o"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i0"], ["n"], axis=0, name="gather"),
             helper.make_node("Max", ["n"], ["nm"], name="max"),
             helper.make_node("Concat", ["nm", "tail"], ["target"], axis=0, name="concat"),
             helper.make_node("Reshape", ["o", "target"], ["r"], name="reshape"),
             helper.make_node("Shape", ["r"], ["rs"], name="shape2"),
             helper.make_node("Expand", ["r", "rs"], ["y"], name="expand")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M", 3])],
                  [_w("w1", 8, 16), _w("w2", 16, 8), _i64("i0", [0]), _i64("tail", [-1, 3])])


def test_dynamic_dims_the_model_cannot_run_at_are_a_usage_error_naming_the_fix() -> None:
    model = dynamic_reshape()
    onnx.checker.check_model(model, full_check=True)
    for run in (graphprune.analyze, lambda m: graphprune.prune(m, {"sparsity": 0.3})):
        with pytest.raises(UsageError) as info:
            run(model)
        message = str(info.value)
        assert info.value.exit_code == 2 and not isinstance(info.value, ShapeUnknown)
        assert "'r'" in message and "Reshape node 'reshape'" in message
        assert "give concrete shapes with --input-shape x=N,T,8 (option input_shapes)" in message
    an = graphprune.analyze(model, input_shapes={"x": [2, 33, 8]})  # 33 * 8 is divisible by 3
    assert an.grouping.prunable


def test_shapes_unknown_after_resolution_block_instead_of_escaping() -> None:
    """A Reshape whose target is a run-time input: at the declared (static) shapes the synthetic target
    does not fit, so onnxruntime cannot give the shapes after it; the Shape of that output and the
    Reshape of the shape vector read a channel count: both must block, not raise."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["hr", "w2"], ["o"], name="fc2"),
             helper.make_node("Reshape", ["o", "t"], ["r"], name="reshape"),
             helper.make_node("Shape", ["r"], ["rs"], name="shape_r"),
             helper.make_node("Expand", ["r", "rs"], ["y"], name="expand")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8]),
                           helper.make_tensor_value_info("t", TensorProto.INT64, [3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 4])],
                   [_w("w1", 8, 16), _w("w2", 16, 8)])
    an = graphprune.analyze(model)
    assert "r" not in an.graph.shapes
    (fc2,) = [g for g in an.grouping.groups if "fc2" in g.producers]
    assert not fc2.prunable and BlockKind.UNKNOWN_SHAPE in {r.kind for r in fc2.reasons}
    assert [g.producers for g in an.grouping.prunable] == [["fc1"]]
    with pytest.raises(InvalidModelError, match="'reshape'"):  # onnxruntime cannot run it on synthetic inputs
        graphprune.prune(model, {"sparsity": 0.3})


def test_shape_vectors_of_unknown_shape_block_the_channel_counts_they_read() -> None:
    """Targets the exact path (shapeflow following a shape vector whose own shape is unknown), which
    shape resolution cannot reach: its entry is dropped by hand."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["o"], name="fc1"),
             helper.make_node("Shape", ["o"], ["s"], name="shape"),
             helper.make_node("Reshape", ["s", "flat"], ["s1"], name="flatten"),
             helper.make_node("Reshape", ["o", "s1"], ["r"], name="reshape"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    model = normalize(_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                             [_w("w1", 8, 16), _w("w2", 16, 4), _i64("flat", [-1])]))
    shapes = resolve_shapes(model, signature(model))
    assert DependencyGraph.build(model, shapes).tracked("o")  # followed: fc1's channels land in place
    del shapes["s1"]
    graph = DependencyGraph.build(model, shapes)
    reasons = [r for _, r in graph.blocks if r.node == "flatten"]
    assert reasons and {r.kind for r in reasons} == {BlockKind.UNKNOWN_SHAPE}
    assert "'s1'" in reasons[0].detail and "--input-shape x=N,8" in reasons[0].detail
    assert not build_groups(graph).prunable


def test_an_unknown_shape_asked_for_outside_analysis_is_a_usage_error() -> None:
    model = normalize(dynamic_reshape("T"))
    graph = DependencyGraph(model, {})
    with pytest.raises(UsageError, match=r"'o' \(MatMul node 'fc2'\).*--input-shape x=N,T,8 \(option input_shapes\)"):
        graph.shape("o")
