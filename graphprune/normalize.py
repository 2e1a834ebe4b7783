"""Normalization: one canonical form of a graph, so the pruner need not know every exporter's.

`normalize` hands the pruner a canonical graph: weights are initializers (no Constant nodes,
Identity/Cast chains or static shape arithmetic in front of them), every use of a weight owns
its tensor, dead nodes are gone and nodes are in topological order. Constant folding evaluates
default-domain ops only, with onnx.reference or a plain onnxruntime session, so no custom-op
library is ever loaded.
"""

from __future__ import annotations

import io
import math
from contextlib import redirect_stdout
from heapq import heapify, heappop, heappush
from typing import Any

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto, helper, numpy_helper

from graphprune.errors import InvalidModelError
from graphprune.loading import require_loaded
from graphprune.model import apply_inference, tensor_types
from graphprune.protowalk import (
    DEFAULT_DOMAINS,
    all_names,
    copy_proto,
    delete_at,
    is_constant,
    node_label,
    node_reads,
    outer_refs,
    replace_all,
    subgraphs,
)
from graphprune.tensors import constant_tensor, densify, static_dims, to_array

__all__ = ["normalize", "tied_families"]

# A fold may produce as many elements as its inputs hold together (so Identity, Cast, Transpose,
# Reshape... of any weight always fold), or this many when that is larger (shape arithmetic and
# small broadcasts). Counting elements rather than bytes lets a dtype-widening Cast of a large
# fp16 weight fold, while Expand/Tile/ConstantOfShape/Range cannot inflate the file.
_FOLD_FLOOR_ELEMENTS = 1 << 18  # 1 MiB of float32

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


def normalize(model: ModelProto, *, copy: bool = True) -> ModelProto:
    """`model` normalized (see the module docstring), as a copy unless `copy=False`; outputs are
    numerically unchanged.

    IR >= 4: initializers listed in graph.input (overridable defaults) are removed from the
    inputs, because the pruner must be free to reshape them. IR < 4 requires every initializer
    to be a graph input, so there the list is rebuilt from the final initializers.
    Subgraphs (If/Loop/Scan bodies) are left untouched; outer-scope names they read are kept.
    Expects a model from load_model: sparse tensors are densified to their (budget-checked) size.
    """
    require_loaded(model)
    out = copy_proto(model) if copy else model
    graph = out.graph
    original_inputs = [copy_proto(vi) for vi in graph.input]
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
    apply_inference(out, update_outputs=False)
    return out


# --------------------------------------------------------------------------- normalization steps


def _densify_sparse_initializers(graph: GraphProto) -> None:
    graph.initializer.extend(densify(s, s.values.name) for s in graph.sparse_initializer)
    del graph.sparse_initializer[:]


def _constants_to_initializers(graph: GraphProto) -> None:
    constants = [i for i, node in enumerate(graph.node) if is_constant(node)]
    graph.initializer.extend(constant_tensor(graph.node[i]) for i in constants)
    delete_at(graph.node, constants)


def _drop_initializer_inputs(graph: GraphProto) -> None:
    names = {t.name for t in graph.initializer}
    delete_at(graph.input, [i for i, vi in enumerate(graph.input) if vi.name in names])


def _list_initializers_as_inputs(graph: GraphProto, original_inputs: list[ValueInfoProto]) -> None:
    """IR < 4: every initializer must be a graph input; keep surviving entries, add new ones."""
    present = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    inputs = [vi for vi in original_inputs if vi.name in present]
    listed = {vi.name for vi in inputs}
    inputs += [
        helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in graph.initializer if t.name not in listed
    ]
    replace_all(graph.input, inputs)


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
        reads = node_reads(node) - available
        undefined = {name for name in reads if name not in producer}
        if undefined:
            raise InvalidModelError(
                f"{node_label(node)} reads {sorted(undefined)}, which no node, initializer or graph input defines"
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
        stuck = [node_label(nodes[i]) for i, count in enumerate(pending) if count][:5]
        raise InvalidModelError(f"the graph has a cycle through {', '.join(stuck)}")
    if order != sorted(order):
        replace_all(graph.node, [nodes[i] for i in order])


def _producers(nodes: list[NodeProto], available: set[str]) -> dict[str, int]:
    """Which node index defines each tensor; a name defined twice breaks SSA and is refused."""
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in filter(None, node.output):
            if name in producer or name in available:
                raise InvalidModelError(
                    f"tensor {name!r} is defined twice ({node_label(node)}); ONNX graphs must be in SSA form"
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
            live |= node_reads(node)
        else:
            dead.append(index)
    delete_at(graph.node, dead)
    delete_at(graph.initializer, [i for i, t in enumerate(graph.initializer) if t.name not in live])


# --------------------------------------------------------------------------- constant folding


def _fold_pass(model: ModelProto) -> bool:
    """Fold what can be folded given one round of shape inference; True when anything changed.

    Nodes are visited in topological order, so a chain of constant nodes folds in one pass.
    Every change removes a node, so repeating until False terminates.
    """
    graph = model.graph
    types = tensor_types(model)
    initializers = {t.name: t for t in graph.initializer}
    shape_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Shape" and n.domain in DEFAULT_DOMAINS}
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
    delete_at(graph.node, folded)
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
    if node.op_type != "Shape" or node.domain not in DEFAULT_DOMAINS:
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
    if shape_node is None or node.op_type not in ("Gather", "Slice") or node.domain not in DEFAULT_DOMAINS:
        return []
    dims = _shape_dims(shape_node, types)
    if dims is None:
        return []
    params = [name for name in node.input[1:] if name]
    if not all(name in initializers for name in params):
        return []
    position = np.arange(len(dims))
    values = [to_array(initializers[name]) for name in params]
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
        node.domain not in DEFAULT_DOMAINS
        or node.op_type in _NEVER_FOLD
        or any(subgraphs(node))
        or not inputs
        or not all(name in initializers for name in inputs)
    ):
        return []
    shapes = [static_dims(types.get(name)) for name in outputs]
    if any(dims is None for dims in shapes):
        return []  # unknown output size: evaluating could allocate anything
    produced = sum(math.prod(dims or []) for dims in shapes)
    consumed = sum(math.prod(initializers[name].dims) for name in inputs)
    if produced > max(consumed, _FOLD_FLOOR_ELEMENTS):
        return []
    if node.op_type == "Identity":  # weight chains: no evaluator (and no import of onnx.reference) needed
        tensor = copy_proto(initializers[inputs[0]])
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
    feeds = {name: to_array(initializers[name]) for name in names}
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
    return same_type and list(tensor.dims) == static_dims(type_proto)


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


# --------------------------------------------------------------------------- shared initializers

_TIED_MIN_ELEMENTS = 16


def _unshare_initializers(graph: GraphProto) -> None:
    """Give every node-input use of an initializer its own tensor, so the pruner can slice uses
    independently. The first use keeps the name unless a graph output or a subgraph (which we
    never rename inside) already claims it; copies are named f"{name}__{k}"."""
    initializers = {t.name: t for t in graph.initializer}
    claimed = {vi.name for vi in graph.output}
    for node in graph.node:
        for sub in subgraphs(node):
            claimed |= outer_refs(sub)
    unclaimed = set(initializers) - claimed
    taken = all_names(graph)
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name not in initializers:
                continue
            if name in unclaimed:
                unclaimed.discard(name)
                continue
            duplicate = copy_proto(initializers[name])
            duplicate.name = _fresh_name(name, taken)
            graph.initializer.append(duplicate)
            node.input[position] = duplicate.name


def tied_families(graph: GraphProto) -> list[list[str]]:
    """Initializers that hold one weight: the copies `_unshare_initializers` made of a shared one
    (ALBERT repeats one layer's weights in every layer) and the duplicates exporters write (the
    TorchScript exporter stores a shared Linear's weight once per use). Equal content of at least
    `_TIED_MIN_ELEMENTS` values, not all the same (fills such as zeros or ones are not one weight).
    The pruner couples each family, so its members stay equal and are tied again after surgery."""
    buckets: dict[tuple[int, tuple[int, ...], bytes], list[tuple[str, np.ndarray]]] = {}
    for t in graph.initializer:
        if math.prod(t.dims) < _TIED_MIN_ELEMENTS:
            continue
        value = to_array(t).reshape(-1)
        head = value[:1024]
        if (head == head[0]).all():
            continue
        buckets.setdefault((t.data_type, tuple(t.dims), head.tobytes()), []).append((t.name, value))
    families = []
    for members in buckets.values():
        while len(members) > 1:
            first, value = members[0]
            same = [name for name, other in members[1:] if np.array_equal(other, value)]
            if same:
                families.append([first, *same])
            members = [(n, v) for n, v in members[1:] if n not in same]
    return families


def _fresh_name(base: str, taken: set[str]) -> str:
    k = 1
    while f"{base}__{k}" in taken:
        k += 1
    taken.add(f"{base}__{k}")
    return f"{base}__{k}"
