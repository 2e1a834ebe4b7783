"""Safe loading of untrusted ONNX models: the first stage of the pipeline.

Loading never trusts the input: sizes are checked from *declared* shapes before any tensor
data is read, external data must stay inside the model's folder, and no custom-op library is
ever registered or loaded. Large external tensors are then left in their files, as checked
references that later stages map (`weights`); everything else is read into the proto. Later
stages may assume a model within the budget whose data is in memory or mapped (`require_loaded`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PureWindowsPath

import numpy as np
import onnx
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message
from onnx import ModelProto, NodeProto, SparseTensorProto, TensorProto

from graphprune import weights
from graphprune.errors import REEXPORT, InvalidModelError, ModelTooLargeError
from graphprune.protowalk import (
    DEFAULT_DOMAINS,
    all_nodes,
    copy_proto,
    dense_tensor_sites,
    is_constant,
    model_graphs,
    node_label,
    tensor_sites,
)
from graphprune.tensors import (
    constant_tensor,
    element_count,
    elements_nbytes,
    size_mismatches,
    static_dims,
    tensor_nbytes,
    to_array,
)
from graphprune.weights import forget_mapping, is_mapped, mappable, mark_mapped

__all__ = ["PROTOBUF_LIMIT", "declared_bytes", "load_model", "require_loaded"]

PROTOBUF_LIMIT = 2**31  # protobuf cannot serialize or parse a message this large
_GENERATORS = frozenset({"ConstantOfShape", "Expand", "Range", "Tile"})


# --------------------------------------------------------------------------- public API


def load_model(source: str | os.PathLike[str] | bytes | ModelProto, *, max_bytes: int = 4 * 1024**3) -> ModelProto:
    """Parse and check a model, then resolve its external data: tensors from `weights.MAP_MIN_BYTES`
    stay in their files as mapped references, smaller ones are read.

    Everything the budget forbids is refused from declared shapes *before* any tensor data is
    read. External data is only accepted for files (bytes have no folder to resolve it against);
    a given ModelProto may hold mapped references this module made. A given ModelProto is copied,
    never modified.
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
    _check_ops(model)
    _check_budget(model, max_bytes)
    if model is source:
        model = copy_proto(model)
    _load_external_data(model, base_dir, trusted=isinstance(source, ModelProto))
    _check_data_sizes(model)
    _check_generated_sizes(model, max_bytes)
    return model


def declared_bytes(model: ModelProto) -> int:
    """Bytes the model's tensors and static graph inputs declare, from shapes alone."""
    return sum(nbytes for _, nbytes in _declared_sizes(model))


def require_loaded(model: ModelProto) -> None:
    """Refuse tensors that point to unchecked external data: only load_model resolves it, inside the checks."""
    for label, tensor in dense_tensor_sites(model):
        if tensor.data_location == TensorProto.EXTERNAL and not is_mapped(tensor):
            raise InvalidModelError(f"{label} still lives in external data; load the model with load_model(path)")


# --------------------------------------------------------------------------- parsing


def _parse(data: bytes, origin: str) -> ModelProto:
    if not data:
        raise InvalidModelError(f"{origin} is empty (0 bytes); {REEXPORT}")
    try:
        model = onnx.load_model_from_string(data)
    except DecodeError as exc:
        raise InvalidModelError(
            f"{origin} is not an ONNX protobuf ({exc}); {REEXPORT} and check the file is complete"
        ) from exc
    invalid = _invalid_text(model)
    if invalid:
        raise InvalidModelError(f"{origin} has a {invalid} that is not valid UTF-8; {REEXPORT}")
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
        if size >= PROTOBUF_LIMIT:
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
    raise InvalidModelError(f"the model {problem}; {REEXPORT}")


def _check_ops(model: ModelProto) -> None:
    """Refuse what no runtime here can run, before any work: an opset newer than this onnx knows, and
    ops neither ONNX, onnxruntime nor a model-local function define. No custom-op library is ever
    loaded, so such a model could be analysed but never validated or measured; prune used to fail
    on it late, in onnxruntime, and inspect not at all."""
    newest = onnx.defs.onnx_opset_version()
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS and entry.version > newest:
            raise InvalidModelError(
                f"the model imports opset {entry.version} of the ONNX domain; this onnx ({onnx.__version__}) "
                f"knows opsets up to {newest}: {REEXPORT} with an opset it knows (e.g. opset_version=17)")
    local = {(f.domain, f.name) for f in model.functions}
    for node in all_nodes(model):
        key = (node.domain, node.op_type)
        if key in local or (node.domain in DEFAULT_DOMAINS and onnx.defs.has(node.op_type)):
            continue
        if (node.domain or "", node.op_type) not in _runtime_ops():
            where = f"domain {node.domain!r}" if node.domain not in DEFAULT_DOMAINS else "the ONNX domain"
            raise InvalidModelError(
                f"{node_label(node)}: op {node.op_type!r} of {where} is implemented neither by ONNX nor by "
                "onnxruntime, and graphprune loads no custom-op libraries, so the model could not be validated "
                "or measured. Replace it with standard ONNX ops (or a model-local function) and re-export")


@cache
def _runtime_ops() -> frozenset[tuple[str, str]]:
    """(domain, op) of every operator onnxruntime registers (ONNX, ai.onnx.ml, com.microsoft, ...)."""
    from onnxruntime.capi import _pybind_state

    return frozenset((s.domain, s.name) for s in _pybind_state.get_all_operator_schema())


def _check_data_sizes(model: ModelProto) -> None:
    """Every tensor's bytes match its declared type and shape (onnxruntime refuses a model at the first
    session otherwise, long after inspect has reported on it)."""
    for label, tensor, held, need in size_mismatches(dense_tensor_sites(model)):
        raise InvalidModelError(
            f"{label} holds {held:,} bytes of data, but its type and shape {list(tensor.dims)} "
            f"need {need:,}: the file is corrupt or was cut; {REEXPORT}")


# --------------------------------------------------------------------------- budget


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
    for label, tensor in tensor_sites(model):
        if isinstance(tensor, SparseTensorProto):
            # onnxruntime densifies sparse tensors, so their dense size is what gets allocated
            dense = elements_nbytes(element_count(tensor.dims, label), tensor.values.data_type, label)
            yield (
                label,
                max(dense, tensor_nbytes(tensor.values, label) + tensor_nbytes(tensor.indices, label)),
            )
        else:
            yield label, tensor_nbytes(tensor, label)
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        dims = static_dims(vi.type)
        if vi.name not in initializers and dims is not None:
            label = f"graph input {vi.name!r}"
            yield label, elements_nbytes(element_count(dims, label), vi.type.tensor_type.elem_type, label)


# --------------------------------------------------------------------------- external data


def _load_external_data(model: ModelProto, base_dir: Path | None, trusted: bool) -> None:
    """Resolve external data: the main graph's large tensors become mapped references, the rest is
    read. `trusted`: a ModelProto given in-process, whose mapped references (made by an earlier load)
    stand; from files and bytes a reference is always resolved again inside the model folder."""
    if not trusted:
        forget_mapping(t for _, t in dense_tensor_sites(model))
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL and not is_mapped(tensor) and mappable(tensor):
            label = f"initializer {tensor.name!r}"
            path, offset, length = _external_range(tensor, label, _folder(base_dir, label))
            if length >= weights.MAP_MIN_BYTES:
                mark_mapped(tensor, path, offset, length)
    for label, tensor in dense_tensor_sites(model):
        if tensor.data_location != TensorProto.EXTERNAL or is_mapped(tensor):
            continue
        path, offset, length = _external_range(tensor, label, _folder(base_dir, label))
        with path.open("rb") as f:
            f.seek(offset)
            tensor.raw_data = f.read(length)
        tensor.ClearField("external_data")
        tensor.ClearField("data_location")


def _folder(base_dir: Path | None, label: str) -> Path:
    if base_dir is None:
        raise InvalidModelError(
            f"{label} keeps its data in an external file, but the model was not given as a file "
            "path, so there is no folder to resolve it against; pass the .onnx path instead"
        )
    return base_dir


def _external_range(tensor: TensorProto, label: str, base_dir: Path) -> tuple[Path, int, int]:
    """The checked file, offset and length of an external tensor's data."""
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
            f"shape/type ({expected:,} bytes); {REEXPORT}"
        )
    if offset + length > path.stat().st_size:
        raise InvalidModelError(
            f"{label}: {str(path)!r} is too short for {length:,} bytes at offset {offset}; "
            "the data file is truncated or belongs to another model"
        )
    return path, offset, length


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


# --------------------------------------------------------------------------- generated sizes


def _check_generated_sizes(model: ModelProto, max_bytes: int) -> None:
    """Refuse ops that would allocate more than the budget from constant shape inputs."""
    sources = _constant_sources(model)
    for node in all_nodes(model):
        if node.domain in DEFAULT_DOMAINS and node.op_type in _GENERATORS:
            nbytes = _generated_nbytes(node, sources)
            if nbytes > max_bytes:
                raise ModelTooLargeError(
                    f"{node_label(node)} creates a tensor of at least {nbytes:,} bytes from constant "
                    f"inputs, over the budget of {max_bytes:,} bytes; raise max_bytes if the model is genuine"
                )


def _generated_nbytes(node: NodeProto, sources: dict[str, TensorProto | NodeProto]) -> int:
    """A lower bound of the op's output size (0 when its inputs are not constant)."""
    label = node_label(node)
    arrays = [_constant_array(name, sources) for name in node.input]
    if node.op_type == "Range":
        return _range_nbytes(arrays, label)
    if node.op_type == "ConstantOfShape":
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        dtype = TensorProto.FLOAT if value is None else value.data_type
        shape = arrays[0] if arrays else None
        return 0 if shape is None else elements_nbytes(element_count(shape.reshape(-1).tolist(), label), dtype, label)
    data, shape = (*arrays, None, None)[:2]
    if shape is None:
        return 0
    numel = element_count(shape.reshape(-1).tolist(), label)
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
        t.name: t for graph in model_graphs(model) for t in graph.initializer
    }
    for node in all_nodes(model):
        if is_constant(node) and node.output and not any(a.ref_attr_name for a in node.attribute):
            sources[node.output[0]] = node
    return sources


def _constant_array(name: str, sources: dict[str, TensorProto | NodeProto]) -> np.ndarray | None:
    source = sources.get(name)
    if source is None:
        return None
    return to_array(source if isinstance(source, TensorProto) else constant_tensor(source))
