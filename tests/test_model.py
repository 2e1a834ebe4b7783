"""Tests for loading, normalization, shape inference and saving (graphprune.loading, .normalize, .model):
hostile inputs are refused early, normalize() keeps outputs exact."""

from __future__ import annotations

import io
import os
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from graphprune import model as gm
from graphprune import normalize as gn
from graphprune import runtime
from graphprune.errors import InvalidModelError, ModelTooLargeError
from graphprune.loading import declared_bytes, load_model
from graphprune.model import infer_shapes, model_bytes, save_model
from graphprune.normalize import normalize

FLOAT = TensorProto.FLOAT
RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- fixtures


def make(
    nodes: Sequence[NodeProto],
    inputs: Sequence[tuple[str, Sequence[int | str]]],
    outputs: Sequence[str],
    initializers: dict[str, np.ndarray] | None = None,
    *,
    ir_version: int = 10,
    opset: int = 17,
) -> ModelProto:
    """A float model; ir_version 10 because onnxruntime reads at most IR 13 (onnx writes 14)."""
    graph = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info(name, FLOAT, list(shape)) for name, shape in inputs],
        [helper.make_tensor_value_info(name, FLOAT, None) for name in outputs],
        [numpy_helper.from_array(value, name) for name, value in (initializers or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def weights(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def run(model: ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(out) for out in session.run(None, feeds)]


def assert_same_outputs(before: ModelProto, after: ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for old, new in zip(run(before, feeds), run(after, feeds), strict=True):
        np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-6)


def ops(model: ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def check(model: ModelProto) -> None:
    """onnx.checker wants shapes on graph outputs; the fixtures leave them to inference."""
    onnx.checker.check_model(infer_shapes(model), full_check=True)


def initializer(model: ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def external_tensor(name: str, dims: Sequence[int], location: str, length: int | None = None) -> TensorProto:
    tensor = TensorProto(name=name, data_type=FLOAT, dims=list(dims))
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    if length is not None:
        tensor.external_data.add(key="length", value=str(length))
    return tensor


def external_model(tensor: TensorProto) -> ModelProto:
    model = make([helper.make_node("Add", ["x", tensor.name], ["y"])], [("x", [4])], ["y"])
    model.graph.initializer.append(tensor)
    return model


def write(path: Path, model: ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())  # raw bytes: no onnx external-data handling
    return path


def mlp() -> ModelProto:
    """Gemm with weight and bias, used as a real model whose bytes we corrupt."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    return make(nodes, [("x", [2, 16])], ["y"], {"w": weights(16, 8), "b": weights(8)})


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize("seed", range(8))
def test_garbage_bytes_are_refused_with_a_fix(seed: int) -> None:
    garbage = np.random.default_rng(seed).integers(0, 256, 64, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidModelError, match="re-export the model"):
        load_model(garbage)


def test_text_is_not_a_model() -> None:
    with pytest.raises(InvalidModelError, match="not an ONNX protobuf"):
        load_model(b"this is definitely not an onnx file\n")


def test_empty_bytes() -> None:
    with pytest.raises(InvalidModelError, match="empty"):
        load_model(b"")


def test_truncated_model_bytes_are_refused_at_every_cut() -> None:
    data = mlp().SerializeToString()
    assert load_model(data).graph.node  # the intact bytes load
    for cut in range(1, len(data), 7):
        with pytest.raises(InvalidModelError):
            load_model(data[:cut])


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="cannot read"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(InvalidModelError, match="not a regular file"):
        load_model(tmp_path)


def test_model_without_nodes_or_graph() -> None:
    empty_graph = make([], [("x", [1])], ["x"])
    with pytest.raises(InvalidModelError, match="without nodes"):
        load_model(empty_graph)
    no_graph = ModelProto(ir_version=10, opset_import=[helper.make_opsetid("", 17)])
    with pytest.raises(InvalidModelError, match="no graph"):
        load_model(no_graph.SerializeToString())


def test_terabyte_external_initializer_is_refused_fast_without_allocating(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"\0" * 16)
    path = write(tmp_path / "m.onnx", external_model(external_tensor("huge", [100000] * 3, "w.bin")))
    assert path.stat().st_size < 300
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ModelTooLargeError) as info:
        load_model(path)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 5 * 1024**2
    message = str(info.value)
    assert "'huge'" in message and "4,000,000,000,000,000 bytes" in message and "4,294,967,296" in message


def test_declared_sizes_without_data_count_against_the_budget() -> None:
    huge_input = make([helper.make_node("Relu", ["x"], ["y"])], [("x", [100000, 100000, 100000])], ["y"])
    with pytest.raises(ModelTooLargeError, match="graph input 'x'"):
        load_model(model_bytes(huge_input))
    huge_weight = mlp()
    huge_weight.graph.initializer.append(TensorProto(name="ghost", data_type=FLOAT, dims=[100000] * 3))
    with pytest.raises(ModelTooLargeError, match="initializer 'ghost'"):
        load_model(model_bytes(huge_weight))
    total = mlp()
    with pytest.raises(ModelTooLargeError, match="tensors declare more than the budget of 600 bytes"):
        load_model(total, max_bytes=600)  # w (512 bytes) + b (32) + x (128)


def test_constant_attribute_inside_subgraph_counts(tmp_path: Path) -> None:
    big = TensorProto(name="v", data_type=FLOAT, dims=[1 << 20, 1 << 20])
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=big)],
        "b",
        [],
        [helper.make_tensor_value_info("c", FLOAT, None)],
    )
    cond = helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch)
    model = make([cond], [], ["y"])
    model.graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    with pytest.raises(ModelTooLargeError, match="attribute 'value' of Constant"):
        load_model(model.SerializeToString())


@pytest.mark.parametrize(
    ("node", "constants"),
    [
        (helper.make_node("ConstantOfShape", ["s"], ["y"]), {"s": np.array([100000] * 3, np.int64)}),
        (helper.make_node("Expand", ["x", "s"], ["y"]), {"s": np.array([100000] * 3, np.int64)}),
        (helper.make_node("Tile", ["x", "s"], ["y"]), {"s": np.array([10**6, 10**6], np.int64)}),
        (
            helper.make_node("Range", ["a", "b", "c"], ["y"]),
            {"a": np.array(0.0, np.float32), "b": np.array(1e12, np.float32), "c": np.array(1.0, np.float32)},
        ),
    ],
    ids=lambda v: getattr(v, "op_type", ""),
)
def test_ops_generating_huge_tensors_from_constants(node: NodeProto, constants: dict[str, np.ndarray]) -> None:
    model = make([node], [("x", [1, 4])], ["y"], constants)
    start = time.perf_counter()
    with pytest.raises(ModelTooLargeError, match=node.op_type):
        load_model(model.SerializeToString())
    assert time.perf_counter() - start < 1.0


def test_generator_shape_from_constant_node() -> None:
    shape = helper.make_node("Constant", [], ["s"], value_ints=[100000, 100000, 100000])
    model = make([shape, helper.make_node("ConstantOfShape", ["s"], ["y"])], [], ["y"])
    with pytest.raises(ModelTooLargeError, match="ConstantOfShape"):
        load_model(model.SerializeToString())


def test_negative_and_overflowing_dims() -> None:
    negative = make([helper.make_node("Relu", ["x"], ["y"])], [("x", [4])], ["y"])
    negative.graph.initializer.append(TensorProto(name="w", data_type=FLOAT, dims=[-1, 4]))
    with pytest.raises(InvalidModelError, match="negative dimension"):
        load_model(negative.SerializeToString())
    overflowing = make([helper.make_node("Relu", ["x"], ["y"])], [("x", [4])], ["y"])
    overflowing.graph.initializer.append(TensorProto(name="w", data_type=FLOAT, dims=[2**40, 2**40]))
    with pytest.raises(InvalidModelError, match="overflows int64"):
        load_model(overflowing.SerializeToString())


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "..\\secret.bin"])
def test_external_data_path_traversal(tmp_path: Path, location: str) -> None:
    (tmp_path / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    path = write(folder / "m.onnx", external_model(external_tensor("w", [4], location)))
    with pytest.raises(InvalidModelError) as info:
        load_model(path)
    assert "'w'" in str(info.value) and repr(location) in str(info.value)


def test_external_data_absolute_path(tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(4, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    path = write(folder / "m.onnx", external_model(external_tensor("w", [4], str(secret))))
    with pytest.raises(InvalidModelError, match="absolute") as info:
        load_model(path)
    assert str(secret) in str(info.value)


def test_external_data_symlink_escaping_the_folder(tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(4, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(secret, folder / "w.bin")
    path = write(folder / "m.onnx", external_model(external_tensor("w", [4], "w.bin")))
    with pytest.raises(InvalidModelError, match="symlink") as info:
        load_model(path)
    assert "'w'" in str(info.value) and "w.bin" in str(info.value)


def test_external_data_inside_the_folder_loads(tmp_path: Path) -> None:
    values = np.arange(8, dtype=np.float32)
    (tmp_path / "w.bin").write_bytes(values.tobytes())
    tensor = external_tensor("w", [4], "w.bin", length=16)
    tensor.external_data.add(key="offset", value="16")
    loaded = load_model(write(tmp_path / "m.onnx", external_model(tensor)))
    np.testing.assert_array_equal(initializer(loaded, "w"), values[4:])
    x = np.ones(4, np.float32)
    np.testing.assert_array_equal(run(loaded, {"x": x})[0], x + values[4:])


def test_external_data_shorter_than_declared(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"\0" * 8)
    path = write(tmp_path / "m.onnx", external_model(external_tensor("w", [4], "w.bin")))
    with pytest.raises(InvalidModelError, match="too short"):
        load_model(path)


def test_external_data_refused_from_bytes() -> None:
    data = external_model(external_tensor("w", [4], "w.bin")).SerializeToString()
    with pytest.raises(InvalidModelError, match="no folder"):
        load_model(data)


def test_load_keeps_versions_and_does_not_modify_the_given_proto() -> None:
    source = mlp()
    source.opset_import.append(helper.make_opsetid("com.example", 3))
    snapshot = source.SerializeToString()
    loaded = load_model(source)
    assert loaded is not source and source.SerializeToString() == snapshot
    assert loaded.ir_version == 10 and list(loaded.opset_import) == list(source.opset_import)


def test_declared_bytes() -> None:
    model = make(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [("x", [1, 4]), ("n", ["N", 4])],
        ["y"],
        {"w": weights(2, 3)},
    )
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.int8), "q"))
    assert declared_bytes(model) == 24 + 3 + 16  # symbolic input 'n' is not counted


# --------------------------------------------------------------------------- normalize


def test_constant_nodes_become_initializers() -> None:
    w, b = weights(4, 3), weights(3)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
        helper.make_node("Constant", [], ["b"], value_floats=b.tolist()),
        helper.make_node("Constant", [], ["s"], value_float=2.0),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["z"]),
        helper.make_node("Mul", ["z", "s"], ["y"]),
    ]
    model = make(nodes, [("x", [2, 4])], ["y"])
    normalized = normalize(model)
    assert ops(normalized) == ["MatMul", "Add", "Mul"]
    np.testing.assert_array_equal(initializer(normalized, "w"), w)
    assert initializer(normalized, "s").shape == ()
    assert_same_outputs(model, normalized, {"x": weights(2, 4)})


def test_identity_and_cast_weight_chains_fold() -> None:
    nodes = [
        helper.make_node("Cast", ["w16"], ["w"], to=FLOAT),
        helper.make_node("Identity", ["b0"], ["b"]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["y"]),
    ]
    model = make(nodes, [("x", [2, 4])], ["y"], {"b0": weights(3)})
    model.graph.initializer.append(numpy_helper.from_array(weights(4, 3).astype(np.float16), "w16"))
    normalized = normalize(model)
    assert ops(normalized) == ["MatMul", "Add"]
    assert {t.name: t.data_type for t in normalized.graph.initializer} == {"w": FLOAT, "b": FLOAT}
    assert_same_outputs(model, normalized, {"x": weights(2, 4)})


def shape_reshape(batch: int | str) -> ModelProto:
    """Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])), as torch emits for x.view(x.size(0), -1)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["r"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["r", "target"], ["y"]),
    ]
    constants = {
        "zero": np.array(0, np.int64),
        "axes": np.array([0], np.int64),
        "minus1": np.array([-1], np.int64),
    }
    return make(nodes, [("x", [batch, 3, 4])], ["y"], constants)


def test_static_shape_subgraph_folds_to_a_constant_reshape_target() -> None:
    model = shape_reshape(2)
    normalized = normalize(model)
    assert ops(normalized) == ["Relu", "Reshape"]
    target = normalized.graph.node[1].input[1]
    np.testing.assert_array_equal(initializer(normalized, target), [2, -1])
    assert_same_outputs(model, normalized, {"x": weights(2, 3, 4)})


def test_symbolic_batch_is_not_folded() -> None:
    model = shape_reshape("N")
    normalized = normalize(model)
    assert ops(normalized) == ops(model)
    assert "target" not in {t.name for t in normalized.graph.initializer}
    for batch in (1, 5):
        assert_same_outputs(model, normalized, {"x": weights(batch, 3, 4)})


def test_static_dims_fold_even_next_to_a_symbolic_batch() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["tail"], start=1),
        helper.make_node("Concat", ["minus1", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("Shape", ["r"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["channels"], axis=0),
        helper.make_node("Div", ["channels", "two"], ["half"]),
        helper.make_node("Slice", ["r", "zero", "half", "one"], ["y"]),
    ]
    constants = {name: np.array([v], np.int64) for name, v in [("minus1", -1), ("zero", 0), ("one", 1), ("two", 2)]}
    static = make(nodes, [("x", [2, 6, 4])], ["y"], constants)
    folded = normalize(static)
    assert ops(folded) == ["Reshape", "Slice"]
    np.testing.assert_array_equal(initializer(folded, "target"), [-1, 6, 4])
    np.testing.assert_array_equal(initializer(folded, "half"), [3])
    assert_same_outputs(static, folded, {"x": weights(2, 6, 4)})
    # with a symbolic batch the static channel reads still fold (the pruner can then rewrite them)
    dynamic = make(nodes, [("x", ["N", 6, 4])], ["y"], constants)
    kept = normalize(dynamic)
    assert ops(kept) == ["Reshape", "Slice"]
    np.testing.assert_array_equal(initializer(kept, "half"), [3])
    for batch in (1, 3):
        assert_same_outputs(dynamic, kept, {"x": weights(batch, 6, 4)})
    # a read of the symbolic batch itself stays a run-time read
    batch_read = make([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["b"]),
                       helper.make_node("Concat", ["b", "minus1"], ["t"], axis=0),
                       helper.make_node("Reshape", ["x", "t"], ["y"])],
                      [("x", ["N", 6, 4])], ["y"], constants)
    assert ops(normalize(batch_read)) == ["Shape", "Gather", "Concat", "Reshape"]


def test_shared_initializer_is_copied_per_use() -> None:
    w = weights(4, 4)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("MatMul", ["a", "w"], ["b"]),
        helper.make_node("Add", ["w", "w"], ["w2"]),
        helper.make_node("MatMul", ["b", "w2"], ["y"]),
    ]
    model = make(nodes, [("x", [2, 4])], ["y"], {"w": w})
    normalized = normalize(model)
    uses = [name for node in normalized.graph.node for name in node.input if name != "x" and name in {"w", "w__1"}]
    names = [t.name for t in normalized.graph.initializer]
    assert len(names) == len(set(names))
    # Add(w, w) has all-constant inputs and folds into w2; the two MatMul uses get their own tensors
    assert uses == ["w", "w__1"]
    np.testing.assert_array_equal(initializer(normalized, "w__1"), w)
    np.testing.assert_array_equal(initializer(normalized, "w2"), w + w)
    assert_same_outputs(model, normalized, {"x": weights(2, 4)})


def test_same_node_reading_an_initializer_twice_gets_two_tensors() -> None:
    nodes = [helper.make_node("Mul", ["x", "s"], ["a"]), helper.make_node("Where", ["c", "s", "a"], ["y"])]
    model = make(nodes, [("x", [3])], ["y"], {"s": weights(3)})
    model.graph.initializer.append(numpy_helper.from_array(np.array([True, False, True]), "c"))
    normalized = normalize(model)
    assert [list(node.input) for node in normalized.graph.node] == [["x", "s"], ["c", "s__1", "a"]]
    mul_twice = make(
        [helper.make_node("Mul", ["w", "x"], ["a"]), helper.make_node("Mul", ["a", "w"], ["y"])],
        [("x", [3])],
        ["y"],
        {"w": weights(3)},
    )
    assert [n for node in normalize(mul_twice).graph.node for n in node.input if n.startswith("w")] == [
        "w",
        "w__1",
    ]


def test_initializer_that_is_a_graph_output_keeps_its_name() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = make(nodes, [("x", [2, 4])], ["y", "w"], {"w": weights(4, 4)})
    normalized = normalize(model)
    assert [o.name for o in normalized.graph.output] == ["y", "w"]
    assert list(normalized.graph.node[0].input) == ["x", "w__1"]
    assert_same_outputs(model, normalized, {"x": weights(2, 4)})


def test_fresh_names_avoid_existing_ones() -> None:
    nodes = [helper.make_node("Add", ["x", "w"], ["w__1"]), helper.make_node("Add", ["w__1", "w"], ["y"])]
    normalized = normalize(make(nodes, [("x", [3])], ["y"], {"w": weights(3)}))
    assert list(normalized.graph.node[1].input) == ["w__1", "w__2"]


def test_dead_nodes_and_unused_initializers_are_removed() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("MatMul", ["x", "unused_w"], ["dead"]),
        helper.make_node("Relu", ["dead"], ["dead2"]),
    ]
    model = make(nodes, [("x", [2, 4])], ["y"], {"w": weights(4, 4), "unused_w": weights(4, 4)})
    normalized = normalize(model)
    assert ops(normalized) == ["MatMul"]
    assert [t.name for t in normalized.graph.initializer] == ["w"]
    assert [vi.name for vi in normalized.graph.input] == ["x"]


def test_unsorted_graph_is_sorted_and_cycles_are_refused() -> None:
    nodes = [helper.make_node("Relu", ["h"], ["y"]), helper.make_node("Neg", ["x"], ["h"])]
    model = make(nodes, [("x", [3])], ["y"])
    normalized = normalize(model)
    assert ops(normalized) == ["Neg", "Relu"]
    check(normalized)
    cycle = make(
        [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])],
        [("x", [3])],
        ["b"],
    )
    with pytest.raises(InvalidModelError, match="cycle"):
        normalize(cycle)
    undefined = make([helper.make_node("Relu", ["ghost"], ["y"])], [("x", [3])], ["y"])
    with pytest.raises(InvalidModelError, match="ghost"):
        normalize(undefined)
    orphan = make([helper.make_node("Relu", ["x"], ["y"])], [("x", [3])], ["y", "phantom"])
    with pytest.raises(InvalidModelError, match="phantom"):
        normalize(orphan)


def test_versions_metadata_and_io_are_preserved() -> None:
    model = shape_reshape(2)
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    model.producer_name, model.producer_version = "unit-test", "9.9"
    helper.set_model_props(model, {"author": "me"})
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", FLOAT, [2, "rest"]))
    normalized = normalize(model)
    assert normalized.ir_version == 10
    assert list(normalized.opset_import) == list(model.opset_import)
    assert (normalized.producer_name, normalized.producer_version) == ("unit-test", "9.9")
    assert list(normalized.metadata_props) == list(model.metadata_props)
    assert list(normalized.graph.input) == list(model.graph.input)
    assert list(normalized.graph.output) == list(model.graph.output)
    assert normalized.graph.value_info  # re-inferred
    assert {vi.name for vi in normalized.graph.value_info} == {"r"}


def test_initializers_listed_as_inputs() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Identity", ["b"], ["b_id"]),
        helper.make_node("Add", ["h", "b_id"], ["y"]),
    ]
    inputs = [("x", [2, 4]), ("w", [4, 3]), ("b", [3])]
    constants = {"w": weights(4, 3), "b": weights(3)}
    ir9 = make(nodes, inputs, ["y"], constants, ir_version=9)
    assert [vi.name for vi in normalize(ir9).graph.input] == ["x"]  # IR >= 4: they are constants
    ir3 = make(nodes, inputs, ["y"], constants, ir_version=3, opset=8)
    normalized = normalize(ir3)
    assert normalized.ir_version == 3 and ops(normalized) == ["MatMul", "Add"]
    # IR < 4 requires every initializer to be an input: 'b' folded into 'b_id', which is listed now
    assert [vi.name for vi in normalized.graph.input] == ["x", "w", "b_id"]
    assert_same_outputs(ir3, normalized, {"x": weights(2, 4)})


def test_subgraph_reads_keep_outer_initializer_names() -> None:
    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, ["x", "w"], [name])],
            name,
            [],
            [helper.make_tensor_value_info(name, FLOAT, None)],
        )

    nodes = [
        helper.make_node("Add", ["x", "w"], ["a"]),
        helper.make_node("If", ["flag"], ["b"], then_branch=branch("t", "Mul"), else_branch=branch("e", "Sub")),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    model = make(nodes, [("x", [3])], ["y"], {"w": weights(3)})
    model.graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    normalized = normalize(model)
    assert list(normalized.graph.node[0].input) == ["x", "w__1"]
    assert {t.name for t in normalized.graph.initializer} == {"w", "w__1"}
    for flag in (True, False):
        assert_same_outputs(model, normalized, {"x": weights(3), "flag": np.array(flag)})


def test_random_and_dequantize_nodes_are_not_folded() -> None:
    nodes = [
        helper.make_node("RandomUniformLike", ["w"], ["noise"], seed=1.0),
        helper.make_node("DequantizeLinear", ["q", "scale"], ["dq"]),
        helper.make_node("Add", ["x", "noise"], ["a"]),
        helper.make_node("Add", ["a", "dq"], ["y"]),
    ]
    model = make(nodes, [("x", [3])], ["y"], {"w": weights(3), "scale": np.array(0.5, np.float32)})
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, -2, 3], np.int8), "q"))
    assert ops(normalize(model)) == ops(model)


def test_fold_size_bound() -> None:
    def expand(rows: int) -> ModelProto:
        nodes = [
            helper.make_node("Expand", ["one", "shape"], ["big"]),
            helper.make_node("Add", ["x", "big"], ["y"]),
        ]
        constants: dict[str, np.ndarray] = {"one": np.ones(1, np.float32), "shape": np.array([rows, 1024], np.int64)}
        return make(nodes, [("x", [rows, 1024])], ["y"], constants)

    assert ops(normalize(expand(16))) == ["Add"]  # 16 Ki elements: folded
    assert ops(normalize(expand(1024))) == ["Expand", "Add"]  # 1 Mi elements from 1: kept


def test_normalize_does_not_modify_its_input() -> None:
    model = shape_reshape(2)
    snapshot = model.SerializeToString()
    normalize(model)
    assert model.SerializeToString() == snapshot


def test_infer_shapes_error_names_the_node() -> None:
    model = make(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        [("x", [2, 3])],
        ["y"],
        {"w": weights(5, 4)},
    )
    with pytest.raises(InvalidModelError, match="proj"):
        infer_shapes(model)
    ok = infer_shapes(shape_reshape(2))
    assert {vi.name for vi in ok.graph.value_info} >= {"r", "shape", "target"}
    assert ok.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 12


def random_chain() -> ModelProto:
    """Constants, casts, shape arithmetic, sharing and dead code in one graph."""
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(weights(8, 6))),
        helper.make_node("Transpose", ["w1"], ["w1t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w1t"], ["h"]),
        helper.make_node("Cast", ["bias16"], ["bias"], to=FLOAT),
        helper.make_node("Add", ["h", "bias"], ["h2"]),
        helper.make_node("Sigmoid", ["h2"], ["s"]),
        helper.make_node("Shape", ["s"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["rows"]),
        helper.make_node("Concat", ["rows", "two", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["s", "target"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["m"]),
        helper.make_node("ReduceSum", ["m", "axes"], ["y"], keepdims=0),
        helper.make_node("Add", ["m", "scale"], ["unused"]),
    ]
    constants = {
        "zero": np.array([0], np.int64),
        "one": np.array([1], np.int64),
        "two": np.array([2], np.int64),
        "minus1": np.array([-1], np.int64),
        "scale": weights(2, 4),
        "axes": np.array([1], np.int64),
    }
    model = make(nodes, [("x", [3, 6])], ["y"], constants)
    model.graph.initializer.append(numpy_helper.from_array(weights(8).astype(np.float16), "bias16"))
    return model


@pytest.mark.parametrize(
    "build",
    [random_chain, mlp, lambda: shape_reshape(2), lambda: shape_reshape("N")],
    ids=["chain", "mlp", "static", "dynamic"],
)
def test_normalize_preserves_outputs_on_random_inputs(build: Callable[[], ModelProto]) -> None:
    model = build()
    normalized = normalize(model)
    check(normalized)
    assert "Constant" not in ops(normalized)
    assert normalize(normalized).SerializeToString() == normalized.SerializeToString()  # idempotent
    for seed in range(3):
        rng = np.random.default_rng(seed)
        feeds = {}
        for vi in model.graph.input:
            dims = [d.dim_value or 2 for d in vi.type.tensor_type.shape.dim]
            feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
        assert_same_outputs(model, normalized, feeds)


def test_random_chain_is_fully_canonical() -> None:
    normalized = normalize(random_chain())
    assert ops(normalized) == ["MatMul", "Add", "Sigmoid", "Reshape", "Mul", "ReduceSum"]
    consumers = [name for node in normalized.graph.node for name in node.input]
    initializers = {t.name for t in normalized.graph.initializer}
    assert len([n for n in consumers if n in initializers]) == len(initializers)  # one use each


# --------------------------------------------------------------------------- saving


def test_save_model_round_trip_is_atomic(tmp_path: Path) -> None:
    model = normalize(mlp())
    path = tmp_path / "out.onnx"
    path.write_bytes(b"old")
    save_model(model, path)
    assert path.read_bytes() == model_bytes(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]  # no temporary left behind
    assert load_model(path).SerializeToString() == model.SerializeToString()


def test_save_model_failure_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.onnx"
    path.write_bytes(b"old")

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gm.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(mlp(), path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_large_models_are_saved_with_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"])]
    model = make(nodes, [("x", [2, 64])], ["y"], {"w": weights(64, 16), "b": weights(16)})
    model.graph.initializer.append(numpy_helper.from_array(np.array(["text"], dtype=object), "label"))
    monkeypatch.setattr(gm, "PROTOBUF_LIMIT", 2000)  # pretend this 4 KiB model is over 2 GiB
    with pytest.raises(ModelTooLargeError, match="2 GiB"):
        model_bytes(model)
    path = tmp_path / "big.onnx"
    save_model(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    raw = onnx.load_model(str(path), load_external_data=False)
    external = {t.name for t in raw.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert external == {"w"}  # 4 KiB weight; the small bias and the string stay inline
    monkeypatch.undo()
    loaded = load_model(path)
    assert loaded.SerializeToString() == load_model(model).SerializeToString()
    x = weights(2, 64)
    np.testing.assert_array_equal(run(loaded, {"x": x})[0], run(model, {"x": x})[0])


def test_prune_round_trips_through_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With protobuf's limit patched down, every model here is "over 2 GiB": the input is saved as
    external data, pruned from that file with OBS and validation, saved as external data again, and the
    result loads back and runs with the outputs' names and shapes unchanged."""
    import graphprune
    from graphprune.demo import demo_model

    monkeypatch.setattr(gm, "PROTOBUF_LIMIT", 8192)  # the demo: ~4 KiB of graph, ~190 KiB in all
    assert gm.serialized_size(demo_model()) > 8192
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    save_model(demo_model(), source)
    assert (source.parent / "model.onnx.data").stat().st_size > 8192
    res = graphprune.prune(str(source), sparsity=0.4, latency_runs=0)
    assert res.report.validation["equivalence"]["passed"] and res.report.compensation["applied"]
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    res.save(out)
    raw = onnx.load_model(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in raw.graph.initializer)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    loaded = load_model(out)
    original = load_model(source)
    x = {"input": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    got, want = runtime.run(runtime.session(loaded), x), runtime.run(runtime.session(original), x)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert loaded.SerializeToString() == load_model(res.model).SerializeToString()


@pytest.mark.slow
def test_a_model_really_past_2_gib_is_saved_and_loads_back(tmp_path: Path) -> None:
    """Not a patched limit: 2.5 GiB of weights, where protobuf's own ByteSize() raises EncodeError."""
    parts = 5  # 5 x 512 MiB
    names = [f"w{i}" for i in range(parts)]
    nodes = [helper.make_node("Sum", names, ["s"]), helper.make_node("Slice", ["s", "zero", "one"], ["first"]),
             helper.make_node("Add", ["x", "first"], ["y"])]
    model = make(nodes, [("x", [1])], ["y"], {"zero": np.array([0]), "one": np.array([1])})
    for i, name in enumerate(names):
        w = np.zeros(1 << 27, np.float32)
        w[0] = i + 1
        model.graph.initializer.append(numpy_helper.from_array(w, name))
        del w
    assert gm.serialized_size(model) > 2**31
    with pytest.raises(ModelTooLargeError, match="2 GiB"):
        model_bytes(model)
    path = tmp_path / "big.onnx"
    save_model(model, path)
    assert (tmp_path / "big.onnx.data").stat().st_size == parts << 29
    del model
    loaded = load_model(path)
    out = runtime.run(runtime.session(loaded), {"x": np.array([0.5], np.float32)})["y"]
    assert out.tolist() == [0.5 + sum(range(1, parts + 1))]


# --------------------------------------------------------------------------- real export


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter is deprecated
def test_torch_export_with_dynamic_batch() -> None:
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8 * 4 * 4, 5)
            self.head = torch.nn.Linear(5, 5)

        def forward(self, x: object) -> object:
            y = torch.relu(self.bn(self.conv(x)))
            z = self.fc(y.reshape(y.shape[0], -1))
            return self.head(z) + z

    torch.manual_seed(0)
    net = Net().eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        net,
        (torch.randn(2, 3, 4, 4),),
        buffer,
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        opset_version=17,
    )
    model = load_model(buffer.getvalue())
    normalized = normalize(model)
    check(normalized)
    assert normalized.ir_version == model.ir_version
    assert list(normalized.opset_import) == list(model.opset_import)
    assert "Constant" not in ops(normalized)
    assert "Shape" in ops(normalized)  # the batch dimension is dynamic: not frozen
    batch_dim = normalized.graph.output[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 4, 4)).astype(np.float32)
        assert_same_outputs(model, normalized, {"x": x})
        np.testing.assert_allclose(
            run(normalized, {"x": x})[0], net(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5
        )


# --------------------------------------------------------------------------- robustness


def test_invalid_utf8_names_are_refused() -> None:
    data = mlp().SerializeToString().replace(b"Relu", b"R\xffel")
    with pytest.raises(InvalidModelError, match="UTF-8"):
        load_model(data)


def test_mutated_models_load_or_fail_cleanly() -> None:
    """Random byte flips must end in a model or InvalidModelError, never another exception."""
    rng = np.random.default_rng(1)
    sources = [mlp().SerializeToString(), random_chain().SerializeToString()]
    outcomes = {"ok": 0, "refused": 0}
    for trial in range(300):
        data = bytearray(sources[trial % 2])
        for position in rng.integers(0, len(data), rng.integers(1, 4)):
            data[position] = rng.integers(0, 256)
        try:
            normalize(load_model(bytes(data)))
            outcomes["ok"] += 1
        except InvalidModelError:
            outcomes["refused"] += 1
    assert outcomes["ok"] and outcomes["refused"]


def test_sparse_tensors_are_densified() -> None:
    def sparse(name: str) -> onnx.SparseTensorProto:
        values = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), name)
        indices = numpy_helper.from_array(np.array([1, 5], np.int64))
        return helper.make_sparse_tensor(values, indices, [2, 3])

    nodes = [
        helper.make_node("Constant", [], ["c"], sparse_value=sparse("ignored")),
        helper.make_node("Add", ["x", "s"], ["a"]),
        helper.make_node("Add", ["a", "c"], ["y"]),
    ]
    model = make(nodes, [("x", [2, 3])], ["y"])
    model.graph.sparse_initializer.append(sparse("s"))
    normalized = normalize(model)
    assert not normalized.graph.sparse_initializer
    expected = np.array([[0, 1.5, 0], [0, 0, -2.0]], np.float32)
    np.testing.assert_array_equal(initializer(normalized, "s"), expected)
    np.testing.assert_array_equal(initializer(normalized, "c"), expected)
    x = weights(2, 3)
    np.testing.assert_allclose(run(normalized, {"x": x})[0], x + 2 * expected)


def test_onnxruntime_evaluates_when_the_reference_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(*args: object) -> list[np.ndarray]:
        raise NotImplementedError

    monkeypatch.setattr(gn, "_run_reference", unavailable)
    model = random_chain()
    normalized = normalize(model)
    assert ops(normalized) == ["MatMul", "Add", "Sigmoid", "Reshape", "Mul", "ReduceSum"]
    assert_same_outputs(model, normalized, {"x": weights(3, 6)})
    monkeypatch.setattr(gn, "_run_onnxruntime", unavailable)
    assert "Cast" in ops(normalize(model))  # nothing can evaluate it: the node stays


def test_constant_graph_output() -> None:
    nodes = [
        helper.make_node("Constant", [], ["k"], value_ints=[1, 2]),
        helper.make_node("Cast", ["k"], ["kf"], to=FLOAT),
        helper.make_node("Mul", ["x", "kf"], ["y"]),
    ]
    model = make(nodes, [("x", [2])], ["y", "kf"])
    normalized = normalize(model)
    assert ops(normalized) == ["Mul"]
    assert list(normalized.graph.node[0].input) == ["x", "kf__1"]
    assert_same_outputs(model, normalized, {"x": weights(2)})


def _mapped_files() -> set[str]:
    """Files this process has mapped (/proc/self/maps), to see which data onnxruntime reads in place."""
    return {line.split(maxsplit=5)[5].strip() for line in Path("/proc/self/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


def test_external_weights_stay_in_their_files_from_load_to_save(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A model with external data is pruned without its weights entering protobuf: loading leaves the
    large tensors as mapped references, onnxruntime maps the files itself, surgery writes the pruned
    weights to a scratch file that is mapped in turn, and saving writes external data again. With the
    mapping floor patched down, the demo's weights count as large; outputs equal the in-memory run's."""
    import graphprune
    from graphprune import weights as gw
    from graphprune.demo import demo_model

    monkeypatch.setattr(gw, "MAP_MIN_BYTES", 4096)
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(demo_model(), source, save_as_external_data=True, location="weights.bin", size_threshold=0)
    data = str((source.parent / "weights.bin").resolve())
    loaded = load_model(source)
    mapped = [t for t in loaded.graph.initializer if gw.is_mapped(t)]
    assert mapped and all(not t.HasField("raw_data") for t in mapped)
    big = {t.name for t in demo_model().graph.initializer if t.ByteSize() >= 4096}
    assert {t.name for t in mapped} == big
    x = {"input": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    sess = runtime.session(loaded, timed=False)
    assert data in _mapped_files()  # onnxruntime maps the user's file (not packing): no copy of the weights
    unpacked = runtime.run(runtime.session(demo_model(), timed=False), x)  # kernels differ with packing
    np.testing.assert_array_equal(runtime.run(sess, x)["logits"], unpacked["logits"])
    want = runtime.run(runtime.session(demo_model()), x)
    del sess

    for sparsity, compensate in ((0.0, "none"), (0.4, "none"), (0.4, "obs")):
        res = graphprune.prune(str(source), sparsity=sparsity, compensate=compensate, latency_runs=0)
        memory = graphprune.prune(demo_model(), sparsity=sparsity, compensate=compensate, latency_runs=0)
        assert res.report.validation["equivalence"]["passed"]
        pruned_mapped = [t for t in res.model.graph.initializer if gw.is_mapped(t)]
        folders = {Path(e.value).parent for t in pruned_mapped for e in t.external_data if e.key == "location"}
        assert folders == {gw.Spill.folder()}  # the pruned model's data lives in one scratch folder
        got = runtime.run(runtime.session(res.model), x)["logits"]
        np.testing.assert_allclose(got, runtime.run(runtime.session(memory.model), x)["logits"], rtol=1e-5, atol=1e-6)
        if sparsity == 0:
            np.testing.assert_array_equal(got, want["logits"])  # a 0% prune reproduces the original
        out = tmp_path / f"out-{sparsity}-{compensate}" / "model.onnx"
        out.parent.mkdir()
        res.save(out)
        assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
        fresh = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(fresh.run(None, x)[0], got)
        assert onnx.load_model(str(out), load_external_data=False).ByteSize() < 8192  # weights not inline
    assert load_model(model_bytes(res.model)).graph.initializer[0].HasField("raw_data")  # bytes hold the data


def test_a_data_file_changed_after_loading_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from graphprune import weights as gw
    from graphprune.demo import demo_model

    monkeypatch.setattr(gw, "MAP_MIN_BYTES", 4096)
    source = tmp_path / "model.onnx"
    onnx.save_model(demo_model(), source, save_as_external_data=True, location="weights.bin", size_threshold=0)
    loaded = load_model(source)
    (tmp_path / "weights.bin").write_bytes((tmp_path / "weights.bin").read_bytes())  # same bytes, new file
    with pytest.raises(InvalidModelError, match="changed after the model was loaded"):
        runtime.session(normalize(loaded))
    gw._maps.clear()


def test_scratch_weights_of_killed_processes_are_swept(tmp_path: Path) -> None:
    """A SIGKILLed worker cannot run its exit handler: the service sweeps its scratch folder later."""
    import subprocess

    from graphprune import weights as gw

    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    dead = tmp_path / f"graphprune-weights-{proc.pid}-abc"
    mine = tmp_path / f"graphprune-weights-{os.getpid()}-xyz"
    odd = tmp_path / "graphprune-weights-notapid-1"
    for folder in (dead, mine, odd):
        folder.mkdir()
        (folder / "weights-0.data").write_bytes(b"\0" * 16)
    assert gw.sweep_scratch(str(tmp_path)) == [dead]
    assert not dead.exists() and mine.is_dir() and odd.is_dir()
    assert gw.Spill.folder().name.startswith(f"graphprune-weights-{os.getpid()}-")
