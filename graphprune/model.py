"""Safe loading and normalization of ONNX models: the first stage of the pipeline.

Loading never trusts the input: sizes are checked from *declared* shapes before any tensor
data is read, external data must stay inside the model's folder, and no custom-op library is
ever registered or loaded (constant folding evaluates default-domain ops only, with
onnx.reference or a plain onnxruntime session).

`normalize` hands the pruner a canonical graph: weights are initializers (no Constant nodes,
Identity/Cast chains or static shape arithmetic in front of them), every use of a weight owns
its tensor, dead nodes are gone and nodes are in topological order.
"""

from __future__ import annotations

import io
import math
import os
import re
import tempfile
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager, redirect_stdout, suppress
from functools import cache
from heapq import heapify, heappop, heappush
from pathlib import Path, PureWindowsPath
from typing import IO, Any, TypeVar

import numpy as np
import onnx
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message
from onnx import (
    GraphProto,
    ModelProto,
    NodeProto,
    SparseTensorProto,
    TensorProto,
    TypeProto,
    ValueInfoProto,
    helper,
    numpy_helper,
)

from graphprune.errors import InvalidModelError, ModelTooLargeError

__all__ = ["declared_bytes", "infer_shapes", "load_model", "model_bytes", "normalize", "save_model"]

_PROTOBUF_LIMIT = 2**31  # protobuf cannot serialize or parse a message this large
_INT64_MAX = 2**63 - 1
_DEFAULT_DOMAINS = ("", "ai.onnx")
_REEXPORT = "re-export the model (torch.onnx.export / tf2onnx / skl2onnx)"

# A fold may produce as many elements as its inputs hold together (so Identity, Cast, Transpose,
# Reshape... of any weight always fold), or this many when that is larger (shape arithmetic and
# small broadcasts). Counting elements rather than bytes lets a dtype-widening Cast of a large
# fp16 weight fold, while Expand/Tile/ConstantOfShape/Range cannot inflate the file.
_FOLD_FLOOR_ELEMENTS = 1 << 18  # 1 MiB of float32
# Shape inference sees the data of initializers up to this size (shape and index tensors);
# larger ones become typed graph inputs, so weights are neither copied nor serialized.
_INFER_DATA_ELEMENTS = 4096
# Main-graph initializers from this size go to the external data file of a > 2 GiB model.
_EXTERNAL_MIN_BYTES = 1024

# Random ops would freeze one sample; DequantizeLinear is kept so quantized weights stay
# quantized; Constant is handled separately (always converted, whatever its size).
_NEVER_FOLD = frozenset(
    {
        "Bernoulli",
        "Constant",
        "DequantizeLinear",
        "Dropout",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)
_DATA_FIELDS = frozenset(
    {"raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"}
)
_GENERATORS = frozenset({"ConstantOfShape", "Expand", "Range", "Tile"})
_CONSTANT_LISTS: dict[str, tuple[int, bool]] = {  # Constant attribute -> (dtype, is scalar)
    "value_float": (TensorProto.FLOAT, True),
    "value_floats": (TensorProto.FLOAT, False),
    "value_int": (TensorProto.INT64, True),
    "value_ints": (TensorProto.INT64, False),
    "value_string": (TensorProto.STRING, True),
    "value_strings": (TensorProto.STRING, False),
}
_SUBBYTE_BITS: dict[int, int] = {
    getattr(TensorProto, name): bits
    for name, bits in (
        ("INT4", 4),
        ("UINT4", 4),
        ("FLOAT4E2M1", 4),
        ("INT2", 2),
        ("UINT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if hasattr(TensorProto, name)
}

_M = TypeVar("_M", bound=Message)


# --------------------------------------------------------------------------- public API


def load_model(source: str | os.PathLike[str] | bytes | ModelProto, *, max_bytes: int = 4 * 1024**3) -> ModelProto:
    """Parse and check a model, then materialise its external data.

    Everything the budget forbids is refused from declared shapes *before* any tensor data is
    read. External data is only accepted for files (bytes and protos have no folder to resolve
    it against). A given ModelProto is copied, never modified.
    """
    base_dir: Path | None = None
    if isinstance(source, ModelProto):
        model = source
    elif isinstance(source, bytes | bytearray):
        model = _parse(bytes(source), "the given bytes")
    else:
        path = Path(source)
        model = _parse(_read_model_file(path, max_bytes), f"model file {str(path)!r}")
        base_dir = path.absolute().parent
    _check_structure(model)
    _check_budget(model, max_bytes)
    if model is source:
        model = _copy(model)
    _load_external_data(model, base_dir)
    _check_generated_sizes(model, max_bytes)
    return model


def declared_bytes(model: ModelProto) -> int:
    """Bytes the model's tensors and static graph inputs declare, from shapes alone."""
    return sum(nbytes for _, nbytes in _declared_sizes(model))


def infer_shapes(model: ModelProto, *, copy: bool = True) -> ModelProto:
    """`model` (a copy unless `copy=False`) with onnx shape inference (strict, data_prop=True) applied.

    Weights are not serialized for inference, so this also works past protobuf's 2 GiB limit.
    Errors become InvalidModelError; onnx's message names the op type and node.
    """
    result = _copy(model) if copy else model
    _apply_inference(result, update_outputs=True)
    return result


def normalize(model: ModelProto, *, copy: bool = True) -> ModelProto:
    """`model` normalized (see the module docstring), as a copy unless `copy=False`; outputs are
    numerically unchanged.

    IR >= 4: initializers listed in graph.input (overridable defaults) are removed from the
    inputs, because the pruner must be free to reshape them. IR < 4 requires every initializer
    to be a graph input, so there the list is rebuilt from the final initializers.
    Subgraphs (If/Loop/Scan bodies) are left untouched; outer-scope names they read are kept.
    Expects a model from load_model: sparse tensors are densified to their (budget-checked) size.
    """
    _require_loaded(model)
    out = _copy(model) if copy else model
    graph = out.graph
    original_inputs = [_copy(vi) for vi in graph.input]
    _densify_sparse_initializers(graph)
    _constants_to_initializers(graph)
    _drop_initializer_inputs(graph)
    del graph.value_info[:]
    _sort_nodes(graph)
    while _fold_pass(out):
        pass
    _unshare_initializers(graph)
    if out.ir_version < 4:
        _list_initializers_as_inputs(graph, original_inputs)
    _apply_inference(out, update_outputs=False)
    return out


def model_bytes(model: ModelProto) -> bytes:
    """The serialized model; refuses what protobuf cannot serialize instead of crashing."""
    size = model.ByteSize()
    if size >= _PROTOBUF_LIMIT:
        raise ModelTooLargeError(
            f"the model serializes to {size:,} bytes, over protobuf's 2 GiB limit; "
            "write it with save_model(), which stores the weights as external data"
        )
    return model.SerializeToString()


def save_model(model: ModelProto, path: str | os.PathLike[str]) -> None:
    """Write atomically (temporary file + os.replace), so readers never see half a model.

    Past protobuf's 2 GiB limit the main-graph weights go to '<file name>.data' next to it,
    written (atomically) before the model file that references it.
    """
    _require_loaded(model)  # references relative to another folder would dangle
    target = Path(path)
    if model.ByteSize() < _PROTOBUF_LIMIT:
        with _atomic_file(target) as f:
            f.write(model.SerializeToString())
        return
    skeleton = without_initializers(model)
    data_path = target.with_name(target.name + ".data")
    with _atomic_file(data_path) as f:
        for tensor in model.graph.initializer:
            big = tensor.data_type != TensorProto.STRING and tensor_nbytes(tensor) >= _EXTERNAL_MIN_BYTES
            skeleton.graph.initializer.append(_write_external(tensor, f, data_path.name) if big else tensor)
    with _atomic_file(target) as f:
        f.write(model_bytes(skeleton))


# --------------------------------------------------------------------------- loading


def _parse(data: bytes, origin: str) -> ModelProto:
    if not data:
        raise InvalidModelError(f"{origin} is empty (0 bytes); {_REEXPORT}")
    try:
        model = onnx.load_model_from_string(data)
    except DecodeError as exc:
        raise InvalidModelError(
            f"{origin} is not an ONNX protobuf ({exc}); {_REEXPORT} and check the file is complete"
        ) from exc
    invalid = _invalid_text(model)
    if invalid:
        raise InvalidModelError(f"{origin} has a {invalid} that is not valid UTF-8; {_REEXPORT}")
    return model


def _invalid_text(message: Message) -> str | None:
    """The first string field holding invalid UTF-8, else None.

    Protobuf checks UTF-8 lazily: a bad name would surface later as bytes or a decode error deep
    in normalization. Every string field is read once here; bulk data (bytes, numbers) is not.
    """
    strings, messages = _text_fields(message.DESCRIPTOR)
    for name in strings:
        try:
            value = getattr(message, name)
            texts = [value] if isinstance(value, str | bytes) else list(value)
        except UnicodeDecodeError:
            return f"{message.DESCRIPTOR.name}.{name}"
        if not all(isinstance(text, str) for text in texts):
            return f"{message.DESCRIPTOR.name}.{name}"
    for name in messages:
        value = getattr(message, name)
        if isinstance(value, Message):
            children = [value] if message.HasField(name) else []
        else:
            children = list(value)
        found = next(filter(None, map(_invalid_text, children)), None)
        if found:
            return found
    return None


@cache
def _text_fields(descriptor: Descriptor) -> tuple[list[str], list[str]]:
    """Names of the string fields and of the message fields of a message type."""
    strings = [f.name for f in descriptor.fields if f.type == f.TYPE_STRING]
    return strings, [f.name for f in descriptor.fields if f.type == f.TYPE_MESSAGE]


def _read_model_file(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InvalidModelError(f"{str(path)!r} is not a regular file; pass the path of an .onnx file")
        if size > max_bytes:
            raise ModelTooLargeError(
                f"model file {str(path)!r} is {size:,} bytes, over the budget of {max_bytes:,} bytes; "
                "raise max_bytes if the model is genuine"
            )
        if size >= _PROTOBUF_LIMIT:
            raise InvalidModelError(
                f"model file {str(path)!r} is over protobuf's 2 GiB limit; save the weights as external "
                "data (onnx.save_model(..., save_as_external_data=True))"
            )
        return path.read_bytes()
    except OSError as exc:
        raise InvalidModelError(f"cannot read model file {str(path)!r}: {exc.strerror or exc}") from exc


def _check_structure(model: ModelProto) -> None:
    """Reject protos that parsed but are not models (random bytes often parse as an empty proto)."""
    if model.ir_version <= 0:
        problem = "declares no IR version, so it is not an ONNX model (or the file is truncated)"
    elif model.ir_version > onnx.IR_VERSION:
        problem = f"has IR version {model.ir_version}, newer than this onnx reads ({onnx.IR_VERSION})"
    elif not model.opset_import:
        problem = "declares no opset_import (truncated file?)"
    elif not model.HasField("graph"):
        problem = "has no graph"
    elif not model.graph.node:
        problem = "has a graph without nodes; there is nothing to prune"
    elif not model.graph.output:
        problem = "has a graph without outputs"
    else:
        return
    raise InvalidModelError(f"the model {problem}; {_REEXPORT}")


def _check_budget(model: ModelProto, max_bytes: int) -> None:
    total = 0
    for label, nbytes in _declared_sizes(model):
        total += nbytes
        if nbytes > max_bytes:
            raise ModelTooLargeError(
                f"{label} declares {nbytes:,} bytes, over the budget of {max_bytes:,} bytes; "
                "raise max_bytes if the model is genuine"
            )
        if total > max_bytes:
            raise ModelTooLargeError(
                f"the model's tensors declare more than the budget of {max_bytes:,} bytes "
                f"({total:,} bytes up to {label}); raise max_bytes if the model is genuine"
            )


def _declared_sizes(model: ModelProto) -> Iterator[tuple[str, int]]:
    for label, tensor in _tensor_sites(model):
        if isinstance(tensor, SparseTensorProto):
            # onnxruntime densifies sparse tensors, so their dense size is what gets allocated
            dense = _nbytes(_numel(tensor.dims, label), tensor.values.data_type, label)
            yield (
                label,
                max(dense, tensor_nbytes(tensor.values, label) + tensor_nbytes(tensor.indices, label)),
            )
        else:
            yield label, tensor_nbytes(tensor, label)
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        dims = _static_dims(vi.type)
        if vi.name not in initializers and dims is not None:
            label = f"graph input {vi.name!r}"
            yield label, _nbytes(_numel(dims, label), vi.type.tensor_type.elem_type, label)


def _load_external_data(model: ModelProto, base_dir: Path | None) -> None:
    for label, tensor in _dense_tensor_sites(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        if base_dir is None:
            raise InvalidModelError(
                f"{label} keeps its data in an external file, but the model was not given as a file "
                "path, so there is no folder to resolve it against; pass the .onnx path instead"
            )
        tensor.raw_data = _read_external(tensor, label, base_dir)
        tensor.ClearField("external_data")
        tensor.ClearField("data_location")


def _read_external(tensor: TensorProto, label: str, base_dir: Path) -> bytes:
    info = {entry.key: entry.value for entry in tensor.external_data}
    path = _external_path(info.get("location", ""), label, base_dir)
    expected = tensor_nbytes(tensor, label)
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", expected))
    except ValueError as exc:
        raise InvalidModelError(f"{label} has a non-integer external offset/length: {exc}") from exc
    if tensor.data_type == TensorProto.STRING or offset < 0 or length != expected:
        raise InvalidModelError(
            f"{label}: external data (offset {offset}, length {length}) does not match its declared "
            f"shape/type ({expected:,} bytes); {_REEXPORT}"
        )
    if offset + length > path.stat().st_size:
        raise InvalidModelError(
            f"{label}: {str(path)!r} is too short for {length:,} bytes at offset {offset}; "
            "the data file is truncated or belongs to another model"
        )
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def _external_path(location: str, label: str, base_dir: Path) -> Path:
    """Resolve `location` inside the model folder; anything that could reach outside it is refused."""
    escapes = (
        not location
        or Path(location).is_absolute()
        or bool(PureWindowsPath(location).drive)
        or location.startswith(("/", "\\"))
        or ".." in re.split(r"[\\/]", location)
    )
    if escapes:
        raise InvalidModelError(
            f"{label} points to external data {location!r}: locations must be relative paths inside "
            f"the model folder {str(base_dir)!r} (no absolute paths, no '..')"
        )
    try:
        resolved = (base_dir / location).resolve()
        inside = resolved.is_relative_to(base_dir.resolve())
        regular = resolved.is_file()
    except (OSError, RuntimeError, ValueError) as exc:
        raise InvalidModelError(f"{label}: cannot resolve external data {location!r}: {exc}") from exc
    if not inside:
        raise InvalidModelError(
            f"{label} points to external data {location!r}, which resolves (through a symlink) to "
            f"{str(resolved)!r}, outside the model folder {str(base_dir)!r}; copy the data next to the model"
        )
    if not regular:
        raise InvalidModelError(f"{label}: external data file {str(resolved)!r} is missing or not a regular file")
    return resolved


def _check_generated_sizes(model: ModelProto, max_bytes: int) -> None:
    """Refuse ops that would allocate more than the budget from constant shape inputs."""
    sources = _constant_sources(model)
    for node in _all_nodes(model):
        if node.domain in _DEFAULT_DOMAINS and node.op_type in _GENERATORS:
            nbytes = _generated_nbytes(node, sources)
            if nbytes > max_bytes:
                raise ModelTooLargeError(
                    f"{_node_label(node)} creates a tensor of at least {nbytes:,} bytes from constant "
                    f"inputs, over the budget of {max_bytes:,} bytes; raise max_bytes if the model is genuine"
                )


def _generated_nbytes(node: NodeProto, sources: dict[str, TensorProto | NodeProto]) -> int:
    """A lower bound of the op's output size (0 when its inputs are not constant)."""
    label = _node_label(node)
    arrays = [_constant_array(name, sources) for name in node.input]
    if node.op_type == "Range":
        return _range_nbytes(arrays, label)
    if node.op_type == "ConstantOfShape":
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        dtype = TensorProto.FLOAT if value is None else value.data_type
        shape = arrays[0] if arrays else None
        return 0 if shape is None else _nbytes(_numel(shape.reshape(-1).tolist(), label), dtype, label)
    data, shape = (*arrays, None, None)[:2]
    if shape is None:
        return 0
    numel = _numel(shape.reshape(-1).tolist(), label)
    if data is None:
        return numel
    return numel * (data.size if node.op_type == "Tile" else 1) * data.itemsize


def _range_nbytes(arrays: list[np.ndarray | None], label: str) -> int:
    scalars = [a for a in arrays if a is not None and a.size == 1]
    if len(scalars) != 3:
        return 0
    start, limit, delta = (a.reshape(-1)[0].item() for a in scalars)
    if delta == 0:
        raise InvalidModelError(f"{label} has delta 0, an endless Range")
    count = (limit - start) / delta
    if not math.isfinite(count):
        raise InvalidModelError(f"{label} has non-finite bounds ({start}, {limit}, {delta})")
    return max(math.ceil(count), 0) * scalars[0].itemsize


def _constant_sources(model: ModelProto) -> dict[str, TensorProto | NodeProto]:
    sources: dict[str, TensorProto | NodeProto] = {
        t.name: t for graph in _model_graphs(model) for t in graph.initializer
    }
    for node in _all_nodes(model):
        if _is_constant(node) and node.output and not any(a.ref_attr_name for a in node.attribute):
            sources[node.output[0]] = node
    return sources


def _constant_array(name: str, sources: dict[str, TensorProto | NodeProto]) -> np.ndarray | None:
    source = sources.get(name)
    if source is None:
        return None
    return _to_array(source if isinstance(source, TensorProto) else _constant_tensor(source))


# --------------------------------------------------------------------------- sizes


def _numel(dims: Iterable[int], label: str) -> int:
    """Element count from declared dims; never allocates, refuses negative or int64-overflowing shapes."""
    dims = list(dims)
    if any(d < 0 for d in dims):
        raise InvalidModelError(f"{label} has a negative dimension in shape {dims}; {_REEXPORT}")
    if 0 in dims:
        return 0
    count = 1
    for d in dims:
        count *= d
        if count > _INT64_MAX:
            raise InvalidModelError(f"{label} has shape {dims}, whose element count overflows int64")
    return count


def _nbytes(numel: int, data_type: int, label: str) -> int:
    bits = _SUBBYTE_BITS.get(data_type)
    if bits is not None:
        return -(-numel * bits // 8)
    try:
        return numel * np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except KeyError as exc:
        raise InvalidModelError(f"{label} has unknown element type {data_type}; {_REEXPORT}") from exc


def tensor_nbytes(tensor: TensorProto, label: str = "") -> int:
    """The bytes a tensor's declared shape and type need (sub-byte types packed), from dims alone."""
    label = label or f"tensor {tensor.name!r}"
    return _nbytes(_numel(tensor.dims, label), tensor.data_type, label)


def _static_dims(type_proto: TypeProto | None) -> list[int] | None:
    """The dims of a tensor type when all are known numbers, else None (symbolic or unknown)."""
    if type_proto is None or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = type_proto.tensor_type.shape.dim
    if all(d.HasField("dim_value") for d in dims):
        return [d.dim_value for d in dims]
    return None


# --------------------------------------------------------------------------- graph walking


def _subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _nested_graphs(graph: GraphProto) -> Iterator[GraphProto]:
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _nested_graphs(sub)


def _model_graphs(model: ModelProto) -> Iterator[GraphProto]:
    yield from _nested_graphs(model.graph)
    for function in model.functions:
        for node in function.node:
            for sub in _subgraphs(node):
                yield from _nested_graphs(sub)


def _all_nodes(model: ModelProto) -> Iterator[NodeProto]:
    for graph in _model_graphs(model):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def _tensor_sites(model: ModelProto) -> Iterator[tuple[str, TensorProto | SparseTensorProto]]:
    """Every tensor stored in the model, with a label for error messages."""
    for graph in _model_graphs(model):
        for tensor in graph.initializer:
            yield f"initializer {tensor.name!r}", tensor
        for sparse in graph.sparse_initializer:
            yield f"sparse initializer {sparse.values.name!r}", sparse
    for node in _all_nodes(model):
        for attr in node.attribute:
            label = f"attribute {attr.name!r} of {_node_label(node)}"
            found: list[TensorProto | SparseTensorProto] = [*attr.tensors, *attr.sparse_tensors]
            found += [attr.t] if attr.HasField("t") else []
            found += [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
            for tensor in found:
                yield label, tensor


def _dense_tensor_sites(model: ModelProto) -> Iterator[tuple[str, TensorProto]]:
    for label, tensor in _tensor_sites(model):
        if isinstance(tensor, SparseTensorProto):
            yield f"{label} (values)", tensor.values
            yield f"{label} (indices)", tensor.indices
        else:
            yield label, tensor


def _outer_refs(graph: GraphProto) -> set[str]:
    """Names a (sub)graph reads from enclosing scopes."""
    defined = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    defined |= {name for node in graph.node for name in node.output}
    reads = {name for node in graph.node for name in _node_reads(node)}
    return reads - defined - {""}


def _node_reads(node: NodeProto) -> set[str]:
    """Explicit inputs plus the outer-scope names its subgraphs use."""
    reads = {name for name in node.input if name}
    for sub in _subgraphs(node):
        reads |= _outer_refs(sub)
    return reads


def _all_names(graph: GraphProto) -> set[str]:
    names = {vi.name for vi in [*graph.input, *graph.output, *graph.value_info]}
    names |= {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    for node in graph.node:
        names.update(node.input, node.output)
        for sub in _subgraphs(node):
            names |= _all_names(sub)
    return names


def _node_label(node: NodeProto) -> str:
    if node.name:
        return f"{node.op_type} node {node.name!r}"
    return f"{node.op_type} node with outputs {list(node.output)}"


def _is_constant(node: NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS


# --------------------------------------------------------------------------- proto helpers


def _copy(message: _M) -> _M:
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate


def _copy_fields(src: Message, dst: Message, skip: Collection[str]) -> None:
    """Copy every set field not in `skip` (message and repeated fields merge, scalars assign)."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        target = getattr(dst, field.name)
        if hasattr(target, "MergeFrom"):
            target.MergeFrom(value)
        else:
            setattr(dst, field.name, value)


def without_initializers(model: ModelProto) -> ModelProto:
    """A copy of everything but the main graph's initializers (the weight bytes)."""
    skeleton = ModelProto()
    _copy_fields(model, skeleton, skip={"graph"})
    _copy_fields(model.graph, skeleton.graph, skip={"initializer"})
    return skeleton


def _replace(field: Any, items: Iterable[Message]) -> None:
    items = list(items)
    del field[:]
    field.extend(items)


def _delete(field: Any, indices: Iterable[int]) -> None:
    for index in sorted(indices, reverse=True):
        del field[index]


def _require_loaded(model: ModelProto) -> None:
    for label, tensor in _dense_tensor_sites(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            raise InvalidModelError(f"{label} still lives in external data; load the model with load_model(path)")


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


def _write_external(tensor: TensorProto, f: IO[bytes], location: str) -> TensorProto:
    """Append the tensor's bytes to `f`; return the tensor with an external reference instead of data."""
    raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.from_array(_to_array(tensor)).raw_data
    offset = f.tell()
    f.write(raw)
    ref = TensorProto()
    _copy_fields(tensor, ref, skip=_DATA_FIELDS)
    ref.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
        ref.external_data.add(key=key, value=value)
    return ref


# --------------------------------------------------------------------------- shape inference


def inference_view(model: ModelProto) -> ModelProto:
    """The model as shape inference needs it: small initializers keep their data (shape tensors),
    large ones become typed graph inputs, so no weight bytes are copied or serialized."""
    skeleton = without_initializers(model)
    listed = {vi.name for vi in skeleton.graph.input}
    for tensor in model.graph.initializer:
        small = math.prod(tensor.dims) <= _INFER_DATA_ELEMENTS
        if small:
            skeleton.graph.initializer.append(tensor)
        if tensor.name not in listed and (not small or model.ir_version < 4):
            skeleton.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return skeleton


def _inferred(model: ModelProto) -> ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(
            inference_view(model), check_type=True, strict_mode=True, data_prop=True
        )
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as exc:
        raise InvalidModelError(
            f"shape inference failed: {str(exc).strip()}; the node named there is inconsistent with its "
            f"inputs: fix it or {_REEXPORT}"
        ) from exc


def _apply_inference(model: ModelProto, *, update_outputs: bool) -> None:
    inferred = _inferred(model).graph
    _replace(model.graph.value_info, inferred.value_info)
    for node, done in zip(model.graph.node, inferred.node, strict=True):
        if any(_subgraphs(node)):
            node.CopyFrom(done)  # carries the subgraphs' inferred value_info
    if update_outputs:
        _replace(model.graph.output, inferred.output)


def _types(model: ModelProto) -> dict[str, TypeProto]:
    graph = _inferred(model).graph
    types = {vi.name: vi.type for vi in [*graph.input, *graph.value_info, *graph.output]}
    for tensor in model.graph.initializer:
        types[tensor.name] = helper.make_tensor_type_proto(tensor.data_type, tensor.dims)
    return types


# --------------------------------------------------------------------------- normalization steps


def _densify(sparse: SparseTensorProto, name: str) -> TensorProto:
    label = f"sparse tensor {name!r}"
    values, indices = _to_array(sparse.values), _to_array(sparse.indices)
    dense = np.zeros(list(sparse.dims), dtype=values.dtype)
    try:
        if indices.ndim == 1:
            dense.reshape(-1)[indices] = values  # linearized indices
        else:
            dense[tuple(indices.T)] = values
    except (IndexError, ValueError) as exc:
        raise InvalidModelError(f"{label} has indices that do not fit its shape: {exc}") from exc
    return numpy_helper.from_array(dense, name)


def _constant_tensor(node: NodeProto) -> TensorProto:
    """The tensor a Constant node produces, named after its output."""
    if len(node.attribute) != 1 or len(node.output) != 1:
        raise InvalidModelError(f"{_node_label(node)} must have exactly one value attribute and one output")
    attr, name = node.attribute[0], node.output[0]
    if attr.name == "value":
        tensor = _copy(attr.t)
        tensor.name = name
        return tensor
    if attr.name == "sparse_value":
        return _densify(attr.sparse_tensor, name)
    if attr.name not in _CONSTANT_LISTS:
        raise InvalidModelError(f"{_node_label(node)} has unknown attribute {attr.name!r}")
    dtype, scalar = _CONSTANT_LISTS[attr.name]
    value = helper.get_attribute_value(attr)
    values = [value] if scalar else list(value)
    return helper.make_tensor(name, dtype, [] if scalar else [len(values)], values)


def _to_array(tensor: TensorProto) -> np.ndarray:
    try:
        return numpy_helper.to_array(tensor)
    except (TypeError, ValueError) as exc:
        raise InvalidModelError(f"tensor {tensor.name!r} has data that does not match its shape/type: {exc}") from exc


def _densify_sparse_initializers(graph: GraphProto) -> None:
    graph.initializer.extend(_densify(s, s.values.name) for s in graph.sparse_initializer)
    del graph.sparse_initializer[:]


def _constants_to_initializers(graph: GraphProto) -> None:
    constants = [i for i, node in enumerate(graph.node) if _is_constant(node)]
    graph.initializer.extend(_constant_tensor(graph.node[i]) for i in constants)
    _delete(graph.node, constants)


def _drop_initializer_inputs(graph: GraphProto) -> None:
    names = {t.name for t in graph.initializer}
    _delete(graph.input, [i for i, vi in enumerate(graph.input) if vi.name in names])


def _list_initializers_as_inputs(graph: GraphProto, original_inputs: list[ValueInfoProto]) -> None:
    """IR < 4: every initializer must be a graph input; keep surviving entries, add new ones."""
    present = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    inputs = [vi for vi in original_inputs if vi.name in present]
    listed = {vi.name for vi in inputs}
    inputs += [
        helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in graph.initializer if t.name not in listed
    ]
    _replace(graph.input, inputs)


def _sort_nodes(graph: GraphProto) -> None:
    """Stable topological sort (original order wins ties).

    Rejects undefined inputs, names defined twice (SSA) and cycles.
    """
    nodes = list(graph.node)
    available = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    producer = _producers(nodes, available)
    orphans = [vi.name for vi in graph.output if vi.name not in available and vi.name not in producer]
    if orphans:
        raise InvalidModelError(f"graph outputs {orphans} are defined by no node, initializer or graph input")
    consumers: list[list[int]] = [[] for _ in nodes]
    pending = [0] * len(nodes)
    for index, node in enumerate(nodes):
        reads = _node_reads(node) - available
        undefined = {name for name in reads if name not in producer}
        if undefined:
            raise InvalidModelError(
                f"{_node_label(node)} reads {sorted(undefined)}, which no node, initializer or graph input defines"
            )
        for source in {producer[name] for name in reads}:
            consumers[source].append(index)
            pending[index] += 1
    ready = [i for i, count in enumerate(pending) if count == 0]
    heapify(ready)
    order: list[int] = []
    while ready:
        index = heappop(ready)
        order.append(index)
        for consumer in consumers[index]:
            pending[consumer] -= 1
            if pending[consumer] == 0:
                heappush(ready, consumer)
    if len(order) < len(nodes):
        stuck = [_node_label(nodes[i]) for i, count in enumerate(pending) if count][:5]
        raise InvalidModelError(f"the graph has a cycle through {', '.join(stuck)}")
    if order != sorted(order):
        _replace(graph.node, [nodes[i] for i in order])


def _producers(nodes: list[NodeProto], available: set[str]) -> dict[str, int]:
    """Which node index defines each tensor; a name defined twice breaks SSA and is refused."""
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in filter(None, node.output):
            if name in producer or name in available:
                raise InvalidModelError(
                    f"tensor {name!r} is defined twice ({_node_label(node)}); ONNX graphs must be in SSA form"
                )
            producer[name] = index
    return producer


def _remove_dead(graph: GraphProto) -> None:
    """Drop nodes that feed no graph output, then initializers nothing reads."""
    live = {vi.name for vi in graph.output}
    dead = []
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if live.intersection(node.output):
            live |= _node_reads(node)
        else:
            dead.append(index)
    _delete(graph.node, dead)
    _delete(graph.initializer, [i for i, t in enumerate(graph.initializer) if t.name not in live])


def _fold_pass(model: ModelProto) -> bool:
    """Fold what can be folded given one round of shape inference; True when anything changed.

    Nodes are visited in topological order, so a chain of constant nodes folds in one pass.
    Every change removes a node, so repeating until False terminates.
    """
    graph = model.graph
    types = _types(model)
    initializers = {t.name: t for t in graph.initializer}
    shape_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Shape" and n.domain in _DEFAULT_DOMAINS}
    folded = []
    for index, node in enumerate(graph.node):
        tensors = (
            _fold_shape(node, types)
            or _fold_shape_read(node, shape_nodes, types, initializers)
            or _fold_constant(node, initializers, types, model)
        )
        if tensors:
            folded.append(index)
            graph.initializer.extend(tensors)
            initializers.update((t.name, t) for t in tensors)
    _delete(graph.node, folded)
    _remove_dead(graph)
    return bool(folded)


def _shape_dims(shape_node: NodeProto, types: dict[str, TypeProto]) -> list[int | None] | None:
    """The dims a Shape node yields (after start/end), None where symbolic; None if unknown rank."""
    source = types.get(shape_node.input[0]) if shape_node.input else None
    if source is None or not source.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in source.tensor_type.shape.dim]
    attrs = {a.name: helper.get_attribute_value(a) for a in shape_node.attribute}
    # ONNX clamps start/end exactly like Python slicing
    return dims[attrs.get("start", 0) : attrs.get("end")]


def _fold_shape(node: NodeProto, types: dict[str, TypeProto]) -> list[TensorProto]:
    """Shape whose yielded dims are all static; symbolic dims are never frozen."""
    if node.op_type != "Shape" or node.domain not in _DEFAULT_DOMAINS:
        return []
    dims = _shape_dims(node, types)
    if dims is None or any(d is None for d in dims):
        return []
    return [numpy_helper.from_array(np.array(dims, dtype=np.int64), node.output[0])]


def _fold_shape_read(
    node: NodeProto, shape_nodes: dict[str, NodeProto], types: dict[str, TypeProto],
    initializers: dict[str, TensorProto],
) -> list[TensorProto]:
    """Gather/Slice of a Shape whose selected dims are all static (e.g. the channel count of a
    dynamic-batch tensor, as torch's chunk() and view() exports read it).

    Folding it makes the value a constant the pruner can rewrite (a Slice bound, a Reshape target)
    instead of a run-time read it would have to treat as fixed.
    """
    shape_node = shape_nodes.get(node.input[0]) if node.input else None
    if shape_node is None or node.op_type not in ("Gather", "Slice") or node.domain not in _DEFAULT_DOMAINS:
        return []
    dims = _shape_dims(shape_node, types)
    if dims is None:
        return []
    params = [name for name in node.input[1:] if name]
    if not all(name in initializers for name in params):
        return []
    position = np.arange(len(dims))
    values = [_to_array(initializers[name]) for name in params]
    try:
        if node.op_type == "Gather":
            if any(a.name == "axis" and a.i != 0 for a in node.attribute):
                return []
            picked = position[values[0]]
        else:
            starts, ends = values[0], values[1]
            axes = values[2] if len(values) > 2 else np.zeros(1, dtype=np.int64)
            steps = values[3] if len(values) > 3 else np.ones(1, dtype=np.int64)
            if axes.reshape(-1).tolist() not in ([0], [-1]):
                return []
            picked = position[int(starts[0]) : int(ends[0]) : int(steps[0])]
    except (IndexError, ValueError):
        return []
    chosen = [dims[int(i)] for i in np.asarray(picked).reshape(-1)]
    if any(d is None for d in chosen):
        return []
    value = np.array(chosen, dtype=np.int64).reshape(np.asarray(picked).shape)
    return [numpy_helper.from_array(value, node.output[0])]


def _fold_constant(
    node: NodeProto, initializers: dict[str, TensorProto], types: dict[str, TypeProto], model: ModelProto
) -> list[TensorProto]:
    """Evaluate a deterministic default-domain node whose inputs are all initializers.

    Only when the inferred output size is known and within _FOLD_FLOOR_ELEMENTS' bound.
    """
    inputs = [name for name in node.input if name]
    outputs = [name for name in node.output if name]
    if (
        node.domain not in _DEFAULT_DOMAINS
        or node.op_type in _NEVER_FOLD
        or any(_subgraphs(node))
        or not inputs
        or not all(name in initializers for name in inputs)
    ):
        return []
    shapes = [_static_dims(types.get(name)) for name in outputs]
    if any(dims is None for dims in shapes):
        return []  # unknown output size: evaluating could allocate anything
    produced = sum(math.prod(dims or []) for dims in shapes)
    consumed = sum(math.prod(initializers[name].dims) for name in inputs)
    if produced > max(consumed, _FOLD_FLOOR_ELEMENTS):
        return []
    if node.op_type == "Identity":  # weight chains: no evaluator (and no import of onnx.reference) needed
        tensor = _copy(initializers[inputs[0]])
        tensor.name = outputs[0]
        return [tensor]
    return _evaluate(node, initializers, types, model)


def _evaluate(
    node: NodeProto, initializers: dict[str, TensorProto], types: dict[str, TypeProto], model: ModelProto
) -> list[TensorProto]:
    """Run one node with onnx.reference, falling back to onnxruntime; [] when neither gives the
    inferred types and shapes (then the node simply stays)."""
    names = list(dict.fromkeys(name for name in node.input if name))
    graph = helper.make_graph(
        [node],
        "fold",
        [helper.make_tensor_value_info(n, initializers[n].data_type, initializers[n].dims) for n in names],
        [helper.make_value_info(name, types[name]) for name in node.output if name],
    )
    single = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    feeds = {name: _to_array(initializers[name]) for name in names}
    for run in (_run_reference, _run_onnxruntime):
        try:
            results = run(single, feeds)
            tensors = [
                numpy_helper.from_array(np.asarray(r), vi.name) for r, vi in zip(results, graph.output, strict=True)
            ]
        except Exception:  # any failure just means "try the next evaluator / do not fold"
            continue
        if all(_matches(t, vi.type) for t, vi in zip(tensors, graph.output, strict=True)):
            return tensors
    return []


def _matches(tensor: TensorProto, type_proto: TypeProto) -> bool:
    same_type = tensor.data_type == type_proto.tensor_type.elem_type
    return same_type and list(tensor.dims) == _static_dims(type_proto)


def _run_reference(single: ModelProto, feeds: dict[str, np.ndarray]) -> list[Any]:
    from onnx.reference import ReferenceEvaluator

    return list(ReferenceEvaluator(single).run(None, feeds))


def _run_onnxruntime(single: ModelProto, feeds: dict[str, np.ndarray]) -> list[Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    with redirect_stdout(io.StringIO()):  # onnxruntime prints a banner when a session fails
        session = ort.InferenceSession(single.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def _unshare_initializers(graph: GraphProto) -> None:
    """Give every node-input use of an initializer its own tensor, so the pruner can slice uses
    independently. The first use keeps the name unless a graph output or a subgraph (which we
    never rename inside) already claims it; copies are named f"{name}__{k}"."""
    initializers = {t.name: t for t in graph.initializer}
    claimed = {vi.name for vi in graph.output}
    for node in graph.node:
        for sub in _subgraphs(node):
            claimed |= _outer_refs(sub)
    unclaimed = set(initializers) - claimed
    taken = _all_names(graph)
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name not in initializers:
                continue
            if name in unclaimed:
                unclaimed.discard(name)
                continue
            duplicate = _copy(initializers[name])
            duplicate.name = _fresh_name(name, taken)
            graph.initializer.append(duplicate)
            node.input[position] = duplicate.name


def _fresh_name(base: str, taken: set[str]) -> str:
    k = 1
    while f"{base}__{k}" in taken:
        k += 1
    taken.add(f"{base}__{k}")
    return f"{base}__{k}"
