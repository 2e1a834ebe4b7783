"""im2col columns and weight matrices of consumers must reproduce the layer's own output."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.consumers import LinearView, linear_views, sampled_patches
from graphprune.depgraph import DependencyGraph
from graphprune.inputs import signature
from graphprune.shapes import resolve_shapes


@pytest.mark.parametrize(("kernel", "strides", "pads", "dilations"), [
    ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((3, 2), (2, 1), (0, 1, 1, 0), (1, 2)),
    ((1, 1), (2, 2), (0, 0, 0, 0), (1, 1)),
])
def test_im2col_times_weights_is_the_conv(kernel: tuple[int, int], strides: tuple[int, int],
                                          pads: tuple[int, ...], dilations: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), strides=list(strides),
                            pads=list(pads), dilations=list(dilations))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    view = LinearView("c", "Conv", "x", 1, "w", None, np.ones(3, bool), kernel, strides, pads, dilations)
    everything = 10**9
    cols = sampled_patches(x, kernel, strides, pads, dilations, everything, np.random.default_rng(0))
    got = cols @ view.matrix(w).T  # [N*OH*OW, Cout] in row-major position order
    want = np.moveaxis(y, 1, -1).reshape(-1, 4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # sampled rows are exactly some of those rows
    some = sampled_patches(x, kernel, strides, pads, dilations, 5, np.random.default_rng(1)) @ view.matrix(w).T
    assert some.shape == (5, 4)
    assert all(np.isclose(want, row, atol=1e-4).all(axis=1).any() for row in some)


def test_removed_columns_cover_each_channel_kernel() -> None:
    view = LinearView("c", "Conv", "x", 1, "w", None, np.array([True, False, True, False]), (2, 2))
    assert view.removed_columns().tolist() == [4, 5, 6, 7, 12, 13, 14, 15]


@pytest.mark.parametrize(("kernel", "strides", "pads", "output_padding", "dilations"), [
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), (1, 1)),
    ((2, 3), (2, 1), (0, 1, 1, 0), (0, 0), (1, 2)),
    ((1, 1), (1, 1), (0, 0, 0, 0), (0, 0), (1, 1)),
])
def test_a_conv_transpose_is_the_conv_of_its_zero_upsampled_input(
        kernel: tuple[int, int], strides: tuple[int, int], pads: tuple[int, ...], output_padding: tuple[int, int],
        dilations: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    w = rng.standard_normal((3, 4, *kernel)).astype(np.float32)  # [in, out, *k]
    b = rng.standard_normal(4).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["h", "w", "b"], ["y"], kernel_shape=list(kernel), strides=list(strides),
                            pads=list(pads), output_padding=list(output_padding), dilations=list(dilations))
    model = _after_identity_conv(node, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")], x.shape)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    (view,) = _views_losing_first_channel(model)
    assert view.op == "ConvTranspose" and view.upsample == strides and view.keep.tolist() == [False, True, True]
    cols = view.columns(x, 10**9, np.random.default_rng(0))
    got = cols @ view.matrix(w).T + b
    np.testing.assert_allclose(got, np.moveaxis(y, 1, -1).reshape(-1, 4), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(view.unmatrix(view.matrix(w), w), w)


def test_a_conv_transpose_cropping_more_than_its_kernel_is_left_to_magnitude() -> None:
    w = numpy_helper.from_array(np.ones((3, 4, 1, 1), np.float32), "w")
    node = helper.make_node("ConvTranspose", ["h", "w"], ["y"], pads=[1, 1, 1, 1])
    assert _views_losing_first_channel(_after_identity_conv(node, [w], (1, 3, 5, 5))) == []


def _after_identity_conv(node: Any, inits: list[Any], shape: tuple[int, ...]) -> Any:
    """x -> 1x1 Conv with identity weights -> h -> `node`: h's channels are tracked (a graph input's
    are not), and h equals x."""
    eye = numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "eye")
    first = helper.make_node("Conv", ["x", "eye"], ["h"])
    graph = helper.make_graph([first, node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [eye, *inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _views_losing_first_channel(model: Any) -> list[LinearView]:
    dg = DependencyGraph.build(model, resolve_shapes(model, signature(model, {})))
    return linear_views(dg, np.isin(np.arange(len(dg.pool)), dg.tracked("h")[1][:1]))
