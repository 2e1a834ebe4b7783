"""Walking and copying ONNX protos, shared by loading, normalization and the model skeleton.

One definition of "every graph, node and stored tensor of a model" (subgraphs and functions
included), so that the safety checks at load time and the rewrites after them cannot disagree
about what a model holds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from typing import Any, TypeVar

from google.protobuf.message import Message
from onnx import GraphProto, ModelProto, NodeProto, SparseTensorProto, TensorProto

__all__ = [
    "DEFAULT_DOMAINS",
    "all_names",
    "all_nodes",
    "copy_fields",
    "copy_proto",
    "delete_at",
    "dense_tensor_sites",
    "is_constant",
    "model_graphs",
    "node_label",
    "node_reads",
    "outer_refs",
    "replace_all",
    "subgraphs",
    "tensor_sites",
]

DEFAULT_DOMAINS = ("", "ai.onnx")

_M = TypeVar("_M", bound=Message)


# --------------------------------------------------------------------------- graph walking


def subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _nested_graphs(graph: GraphProto) -> Iterator[GraphProto]:
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from _nested_graphs(sub)


def model_graphs(model: ModelProto) -> Iterator[GraphProto]:
    yield from _nested_graphs(model.graph)
    for function in model.functions:
        for node in function.node:
            for sub in subgraphs(node):
                yield from _nested_graphs(sub)


def all_nodes(model: ModelProto) -> Iterator[NodeProto]:
    for graph in model_graphs(model):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def tensor_sites(model: ModelProto) -> Iterator[tuple[str, TensorProto | SparseTensorProto]]:
    """Every tensor stored in the model, with a label for error messages."""
    for graph in model_graphs(model):
        for tensor in graph.initializer:
            yield f"initializer {tensor.name!r}", tensor
        for sparse in graph.sparse_initializer:
            yield f"sparse initializer {sparse.values.name!r}", sparse
    for node in all_nodes(model):
        for attr in node.attribute:
            label = f"attribute {attr.name!r} of {node_label(node)}"
            found: list[TensorProto | SparseTensorProto] = [*attr.tensors, *attr.sparse_tensors]
            found += [attr.t] if attr.HasField("t") else []
            found += [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
            for tensor in found:
                yield label, tensor


def dense_tensor_sites(model: ModelProto) -> Iterator[tuple[str, TensorProto]]:
    for label, tensor in tensor_sites(model):
        if isinstance(tensor, SparseTensorProto):
            yield f"{label} (values)", tensor.values
            yield f"{label} (indices)", tensor.indices
        else:
            yield label, tensor


def outer_refs(graph: GraphProto) -> set[str]:
    """Names a (sub)graph reads from enclosing scopes."""
    defined = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    defined |= {name for node in graph.node for name in node.output}
    reads = {name for node in graph.node for name in node_reads(node)}
    return reads - defined - {""}


def node_reads(node: NodeProto) -> set[str]:
    """Explicit inputs plus the outer-scope names its subgraphs use."""
    reads = {name for name in node.input if name}
    for sub in subgraphs(node):
        reads |= outer_refs(sub)
    return reads


def read_counts(graph: GraphProto) -> Counter[str]:
    """Readers per name: the nodes reading it (with the outer names their subgraphs read) and the graph
    outputs, so a rewrite can tell a value only one node sees."""
    reads = Counter(name for node in graph.node for name in node_reads(node))
    reads.update(o.name for o in graph.output)
    return reads


def fixed_initializers(graph: GraphProto) -> dict[str, TensorProto]:
    """The initializers that are constants: one that is also a graph input is a default the caller may
    override."""
    inputs = {vi.name for vi in graph.input}
    return {t.name: t for t in graph.initializer if t.name not in inputs}


def all_names(graph: GraphProto) -> set[str]:
    names = {vi.name for vi in [*graph.input, *graph.output, *graph.value_info]}
    names |= {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    for node in graph.node:
        names.update(node.input, node.output)
        for sub in subgraphs(node):
            names |= all_names(sub)
    return names


def fresh_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`... the first not in `taken`, which it joins."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def node_label(node: NodeProto) -> str:
    if node.name:
        return f"{node.op_type} node {node.name!r}"
    return f"{node.op_type} node with outputs {list(node.output)}"


def is_constant(node: NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS


# --------------------------------------------------------------------------- proto helpers


def copy_proto(message: _M) -> _M:
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate


def copy_fields(src: Message, dst: Message, skip: Collection[str]) -> None:
    """Copy every set field not in `skip` (message and repeated fields merge, scalars assign)."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        target = getattr(dst, field.name)
        if hasattr(target, "MergeFrom"):
            target.MergeFrom(value)
        else:
            setattr(dst, field.name, value)


def replace_all(field: Any, items: Iterable[Message]) -> None:
    items = list(items)
    del field[:]
    field.extend(items)


def delete_at(field: Any, indices: Iterable[int]) -> None:
    for index in sorted(indices, reverse=True):
        del field[index]
