"""Shape inference and saving, both built on the model's weightless skeleton.

Weights are neither copied nor serialized to infer shapes, and past protobuf's 2 GiB limit (or when
they are mapped from files) they are written beside the skeleton as external data, so both work on
models of any size.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import onnx
from onnx import ModelProto, TensorProto, TypeProto, helper, numpy_helper

from graphprune.errors import REEXPORT, InvalidModelError, ModelTooLargeError
from graphprune.loading import PROTOBUF_LIMIT, require_loaded
from graphprune.protowalk import copy_fields, copy_proto, model_graphs, replace_all, subgraphs
from graphprune.tensors import tensor_nbytes, to_array
from graphprune.weights import DataWriter, is_mapped, mapped_nbytes

__all__ = [
    "Inference",
    "Uninferable",
    "apply_inference",
    "infer_shapes",
    "infer_view",
    "inference_view",
    "model_bytes",
    "save_model",
    "tensor_types",
    "without_initializers",
]

# Shape inference sees the data of initializers up to this size (shape and index tensors);
# larger ones become typed graph inputs, so weights are neither copied nor serialized.
_INFER_DATA_ELEMENTS = 4096
# Main-graph initializers from this size go to the external data file of a > 2 GiB model.
_EXTERNAL_MIN_BYTES = 1024
_DATA_FIELDS = frozenset(
    {"raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"}
)


def without_initializers(model: ModelProto) -> ModelProto:
    """A copy of everything but the main graph's initializers (the weight bytes)."""
    skeleton = ModelProto()
    copy_fields(model, skeleton, skip={"graph"})
    copy_fields(model.graph, skeleton.graph, skip={"initializer"})
    return skeleton


# --------------------------------------------------------------------------- shape inference


def infer_shapes(model: ModelProto, *, copy: bool = True) -> ModelProto:
    """`model` (a copy unless `copy=False`) with onnx shape inference (strict, data_prop=True, with
    `infer_view`'s fallbacks) applied.

    Weights are not serialized for inference, so this also works past protobuf's 2 GiB limit.
    A model neither onnx nor onnxruntime accepts is an InvalidModelError; onnx's message names the op
    type and node.
    """
    result = copy_proto(model) if copy else model
    apply_inference(result, update_outputs=True)
    return result


def inference_view(model: ModelProto) -> ModelProto:
    """The model as shape inference needs it: small initializers keep their data (shape tensors),
    large ones become typed graph inputs, so no weight bytes are copied or serialized."""
    skeleton = without_initializers(model)
    listed = {vi.name for vi in skeleton.graph.input}
    for tensor in model.graph.initializer:
        small = math.prod(tensor.dims) <= _INFER_DATA_ELEMENTS
        if small:  # a mapped one's data is read: checkers refuse its absolute location
            skeleton.graph.initializer.append(_inline(tensor))
        if tensor.name not in listed and (not small or model.ir_version < 4):
            skeleton.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return skeleton


_INFERENCE_ERRORS = (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError)


class Uninferable(InvalidModelError):
    """Neither onnx's shape inference nor onnxruntime accepts the model; `detail` names the node."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{detail}; the node named there is inconsistent with its inputs: fix it or {REEXPORT}")
        self.detail = detail


@dataclass(frozen=True)
class Inference:
    """Shape inference's result and what it took: "strict" inference as is, "unannotated" (strict
    once the model's own declared shapes were dropped) or "lenient" (onnx rejects the model,
    onnxruntime accepts it: shapes onnx cannot infer must be read off a run); `error` is onnx's
    strict-inference error when there was one."""

    model: ModelProto
    fallback: Literal["strict", "unannotated", "lenient"] = "strict"
    error: str = ""


def infer_view(view: ModelProto) -> Inference:
    """Shape inference of `view` (an `inference_view`), falling back as `Inference` says.

    Exporters (Paddle 3 seen) write stale value_info or output shapes that contradict what the nodes
    compute, and use ops whose onnx inference is stricter than onnxruntime's: both run, so neither may
    make the model invalid. Only a model onnxruntime cannot load either is an InvalidModelError.
    """
    try:
        return Inference(_strict(view))
    except _INFERENCE_ERRORS as exc:
        error = _error_text(exc)
    bare = _without_declared_shapes(view)
    try:
        return Inference(_strict(bare), "unannotated", error)
    except _INFERENCE_ERRORS as exc:
        error = _error_text(exc)
    from graphprune import runtime  # runtime builds on this module

    try:
        runtime.session(view, timed=False)
    except InvalidModelError as exc:
        raise Uninferable(f"shape inference failed: {error}; {exc}") from exc
    try:
        lenient = onnx.shape_inference.infer_shapes(bare, strict_mode=False, data_prop=True)
    except _INFERENCE_ERRORS:  # onnxruntime's run supplies every shape then
        lenient = bare
    return Inference(lenient, "lenient", error)


def _strict(view: ModelProto) -> ModelProto:
    return onnx.shape_inference.infer_shapes(view, check_type=True, strict_mode=True, data_prop=True)


def _error_text(exc: Exception) -> str:
    return " ".join(str(exc).split())  # onnx's messages span lines


def _without_declared_shapes(view: ModelProto) -> ModelProto:
    """`view` without the shapes the model declares for what its nodes compute (every graph's
    value_info, the graph outputs' shapes; element types kept): inference derives them again."""
    bare = copy_proto(view)
    for graph in model_graphs(bare):
        del graph.value_info[:]
    for out in bare.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    return bare


def _inferred(model: ModelProto) -> ModelProto:
    return infer_view(inference_view(model)).model


def apply_inference(model: ModelProto, *, update_outputs: bool) -> None:
    """Store inferred value_info in `model` (in place); graph output types too with `update_outputs`."""
    inferred = _inferred(model).graph
    replace_all(model.graph.value_info, inferred.value_info)
    for node, done in zip(model.graph.node, inferred.node, strict=True):
        if any(subgraphs(node)):
            node.CopyFrom(done)  # carries the subgraphs' inferred value_info
    if update_outputs:
        replace_all(model.graph.output, inferred.output)


def tensor_types(model: ModelProto) -> dict[str, TypeProto]:
    """The inferred type of every main-graph tensor; initializers typed from their own dims."""
    graph = _inferred(model).graph
    types = {vi.name: vi.type for vi in [*graph.input, *graph.value_info, *graph.output]}
    for tensor in model.graph.initializer:
        types[tensor.name] = helper.make_tensor_type_proto(tensor.data_type, tensor.dims)
    return types


# --------------------------------------------------------------------------- saving


def serialized_size(model: ModelProto) -> int:
    """The model's serialized size with its mapped weights inline, or a bound within a few bytes per
    tensor of it: protobuf's own `ByteSize()` raises EncodeError on a message past 2 GiB, so the
    main-graph initializers are measured one by one (each field's tag and length prefix at most 11 bytes)."""
    tensors = model.graph.initializer
    return without_initializers(model).ByteSize() + sum(
        t.ByteSize() + 11 + (mapped_nbytes(t) if is_mapped(t) else 0) for t in tensors)


def model_bytes(model: ModelProto) -> bytes:
    """The serialized model, mapped weights read in; refuses what protobuf cannot serialize instead of crashing."""
    size = serialized_size(model)
    if size >= PROTOBUF_LIMIT:
        raise ModelTooLargeError(
            f"the model serializes to {size:,} bytes, over protobuf's 2 GiB limit; "
            "write it with save_model(), which stores the weights as external data"
        )
    if not any(is_mapped(t) for t in model.graph.initializer):
        return model.SerializeToString()
    inline = without_initializers(model)
    inline.graph.initializer.extend(_inline(t) for t in model.graph.initializer)
    return inline.SerializeToString()


def _inline(tensor: TensorProto) -> TensorProto:
    """The tensor with its data in the proto (read from its file when mapped)."""
    return numpy_helper.from_array(to_array(tensor), tensor.name) if is_mapped(tensor) else tensor


def save_model(model: ModelProto, path: str | os.PathLike[str]) -> None:
    """Write atomically (temporary file + os.replace), so readers never see half a model.

    A model whose weights are mapped from files, or past protobuf's 2 GiB limit, keeps its main-graph
    weights in '<file name>.data' next to it, written (atomically, tensor by tensor, mapped ones copied
    by the kernel) before the model file that references it.
    """
    require_loaded(model)  # references relative to another folder would dangle
    target = Path(path)
    mapped = any(is_mapped(t) for t in model.graph.initializer)
    if not mapped and serialized_size(model) < PROTOBUF_LIMIT:
        with _atomic_file(target) as f:
            f.write(model.SerializeToString())
        return
    skeleton = without_initializers(model)
    data_path = target.with_name(target.name + ".data")
    with _atomic_file(data_path) as f:
        writer = DataWriter(f)
        for tensor in model.graph.initializer:
            if is_mapped(tensor):
                offset, length = writer.copy(tensor)
            elif tensor.data_type != TensorProto.STRING and tensor_nbytes(tensor) >= _EXTERNAL_MIN_BYTES:
                offset, length = writer.raw(tensor.raw_data if tensor.HasField("raw_data") else
                                            numpy_helper.from_array(to_array(tensor)).raw_data)
            else:
                skeleton.graph.initializer.append(tensor)
                continue
            skeleton.graph.initializer.append(_external_ref(tensor, data_path.name, offset, length))
    with _atomic_file(target) as f:
        f.write(model_bytes(skeleton))


@contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _external_ref(tensor: TensorProto, location: str, offset: int, length: int) -> TensorProto:
    """The tensor with a reference to `length` bytes at `offset` of `location` instead of data."""
    ref = TensorProto()
    copy_fields(tensor, ref, skip=_DATA_FIELDS | {"external_data", "data_location"})
    ref.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        ref.external_data.add(key=key, value=value)
    return ref
