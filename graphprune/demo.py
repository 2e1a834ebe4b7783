"""A small bundled CNN so `graphprune demo` works on a fresh machine with nothing downloaded.

It holds the couplings that trip pruners: a residual Add, a depthwise conv, a squeeze-excitation
gate, a Concat and a Flatten into a classifier. Weights are seeded random.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper


def demo_model(seed: int = 0) -> ModelProto:
    rng = np.random.default_rng(seed)
    inits = []
    nodes = []

    def w(name: str, *shape: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name))
        return name

    def conv(x: str, y: str, cin: int, cout: int, k: int = 3, group: int = 1) -> str:
        nodes.append(helper.make_node("Conv", [x, w(f"{y}.w", cout, cin // group, k, k), w(f"{y}.b", cout)],
                                      [y], name=y, pads=[k // 2] * 4, group=group))
        return y

    def op(kind: str, inputs: list[str], y: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(kind, inputs, [y], name=y, **attrs))
        return y

    x = op("Relu", [conv("input", "stem", 3, 16)], "stem_act")
    b = op("Relu", [conv(x, "block_a", 16, 16)], "block_a_act")
    b = conv(b, "block_b", 16, 16)
    x = op("Relu", [op("Add", [x, b], "residual")], "res_act")
    d = op("Relu", [conv(x, "dw", 16, 16, group=16)], "dw_act")
    s = op("GlobalAveragePool", [d], "se_pool")
    s = op("Relu", [conv(s, "se_reduce", 16, 4, k=1)], "se_act")
    s = op("Sigmoid", [conv(s, "se_expand", 4, 16, k=1)], "se_gate")
    d = op("Mul", [d, s], "se_scaled")
    p = op("Relu", [conv(d, "project", 16, 24, k=1)], "project_act")
    c = op("Concat", [p, x], "concat", axis=1)
    c = op("MaxPool", [c], "pool", kernel_shape=[4, 4], strides=[4, 4])
    f = op("Flatten", [c], "flatten", axis=1)
    h = op("Relu", [op("Gemm", [f, w("fc1.w", 64, 40 * 4 * 4), w("fc1.b", 64)], "fc1", transB=1)], "fc1_act")
    op("Gemm", [h, w("fc2.w", 64, 10), w("fc2.b", 10)], "logits")
    graph = helper.make_graph(
        nodes, "graphprune-demo",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="graphprune")
    model.ir_version = 8
    return model
