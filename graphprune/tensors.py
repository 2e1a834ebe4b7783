"""Sizes and values of tensor protos, read without trusting them.

A size comes from declared dims alone and never allocates, so budgets are checked before any
data is read; data that does not match its declaration is an InvalidModelError instead of a
numpy error deep in a later stage. Loading, normalization, saving and validation all read
tensors through here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from onnx import NodeProto, SparseTensorProto, TensorProto, TypeProto, helper, numpy_helper

from graphprune.errors import REEXPORT, InvalidModelError
from graphprune.protowalk import copy_proto, node_label
from graphprune.weights import is_mapped, map_array

__all__ = [
    "constant_tensor",
    "densify",
    "element_count",
    "elements_nbytes",
    "size_mismatches",
    "static_dims",
    "tensor_nbytes",
    "to_array",
]

_INT64_MAX = 2**63 - 1
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


# --------------------------------------------------------------------------- sizes


def element_count(dims: Iterable[int], label: str) -> int:
    """Element count from declared dims; never allocates, refuses negative or int64-overflowing shapes."""
    dims = list(dims)
    if any(d < 0 for d in dims):
        raise InvalidModelError(f"{label} has a negative dimension in shape {dims}; {REEXPORT}")
    if 0 in dims:
        return 0
    count = 1
    for d in dims:
        count *= d
        if count > _INT64_MAX:
            raise InvalidModelError(f"{label} has shape {dims}, whose element count overflows int64")
    return count


def elements_nbytes(numel: int, data_type: int, label: str) -> int:
    bits = _SUBBYTE_BITS.get(data_type)
    if bits is not None:
        return -(-numel * bits // 8)
    try:
        return numel * np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except KeyError as exc:
        raise InvalidModelError(f"{label} has unknown element type {data_type}; {REEXPORT}") from exc


def tensor_nbytes(tensor: TensorProto, label: str = "") -> int:
    """The bytes a tensor's declared shape and type need (sub-byte types packed), from dims alone."""
    label = label or f"tensor {tensor.name!r}"
    return elements_nbytes(element_count(tensor.dims, label), tensor.data_type, label)


def size_mismatches(sites: Iterable[tuple[str, TensorProto]]) -> Iterator[tuple[str, TensorProto, int, int]]:
    """(label, tensor, bytes held, bytes needed) for each tensor whose raw data does not match its declared
    type and shape. Loading refuses such input, validation such output; each says so in its own words."""
    for label, tensor in sites:
        if tensor.HasField("raw_data"):
            held = len(tensor.raw_data)
            if held != (need := tensor_nbytes(tensor, label)):
                yield label, tensor, held, need


def static_dims(type_proto: TypeProto | None) -> list[int] | None:
    """The dims of a tensor type when all are known numbers, else None (symbolic or unknown)."""
    if type_proto is None or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = type_proto.tensor_type.shape.dim
    if all(d.HasField("dim_value") for d in dims):
        return [d.dim_value for d in dims]
    return None


# --------------------------------------------------------------------------- values


def to_array(tensor: TensorProto) -> np.ndarray:
    """The tensor's value; a read-only view of its file for a mapped tensor (`weights`)."""
    if is_mapped(tensor):
        return map_array(tensor)
    try:
        return numpy_helper.to_array(tensor)
    except (TypeError, ValueError) as exc:
        raise InvalidModelError(f"tensor {tensor.name!r} has data that does not match its shape/type: {exc}") from exc


def densify(sparse: SparseTensorProto, name: str) -> TensorProto:
    label = f"sparse tensor {name!r}"
    values, indices = to_array(sparse.values), to_array(sparse.indices)
    dense = np.zeros(list(sparse.dims), dtype=values.dtype)
    try:
        if indices.ndim == 1:
            dense.reshape(-1)[indices] = values  # linearized indices
        else:
            dense[tuple(indices.T)] = values
    except (IndexError, ValueError) as exc:
        raise InvalidModelError(f"{label} has indices that do not fit its shape: {exc}") from exc
    return numpy_helper.from_array(dense, name)


def constant_tensor(node: NodeProto) -> TensorProto:
    """The tensor a Constant node produces, named after its output."""
    if len(node.attribute) != 1 or len(node.output) != 1:
        raise InvalidModelError(f"{node_label(node)} must have exactly one value attribute and one output")
    attr, name = node.attribute[0], node.output[0]
    if attr.name == "value":
        tensor = copy_proto(attr.t)
        tensor.name = name
        return tensor
    if attr.name == "sparse_value":
        return densify(attr.sparse_tensor, name)
    if attr.name not in _CONSTANT_LISTS:
        raise InvalidModelError(f"{node_label(node)} has unknown attribute {attr.name!r}")
    dtype, scalar = _CONSTANT_LISTS[attr.name]
    value = helper.get_attribute_value(attr)
    values = [value] if scalar else list(value)
    return helper.make_tensor(name, dtype, [] if scalar else [len(values)], values)
