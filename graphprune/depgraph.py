"""The dependency graph: which channel positions of which tensors are coupled.

Each tracked channel dimension (tensor, axis) carries a label array (one element id per position).
Rules from the registry create and couple labels node by node in topological order. A tensor that is
not tracked on an axis has fixed channels there; coupling a tracked axis with a fixed one blocks it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from numpy.typing import NDArray
from onnx import AttributeProto, ModelProto, NodeProto

from graphprune import shapeflow
from graphprune.elements import ElementPool, Labels
from graphprune.normalize import tied_families
from graphprune.onnxutil import node_name
from graphprune.protowalk import node_label
from graphprune.reasons import BlockKind, BlockReason, ShapeUnknown, Unmappable
from graphprune.rules import rule_for
from graphprune.shapes import input_shape_fix
from graphprune.tensors import to_array
from graphprune.weights import is_mapped

# ops whose rule judges the shape vector it reads (check_shape_entries)
SHAPE_CONSUMERS = frozenset({"Reshape", "Expand", "Resize"})

FIXED_OPS_REASONS: dict[str, BlockKind] = {
    "If": BlockKind.CONTROL_FLOW,
    "Loop": BlockKind.CONTROL_FLOW,
    "Scan": BlockKind.CONTROL_FLOW,
}


@dataclass(frozen=True)
class Consume:
    """`node.input[index]` contracts its channels on `axis` (a consumer: Conv input, MatMul K...)."""

    node: str
    index: int
    tensor: str
    axis: int


class DependencyGraph:
    def __init__(self, model: ModelProto, shapes: dict[str, tuple[int, ...]], approximate_norms: bool = False) -> None:
        self.model = model
        # cross-channel normalizations let channels go (their statistics then come from the kept ones),
        # each such place recorded in `approximations` instead of blocking
        self.approximate_norms = approximate_norms
        self.approximations: list[tuple[Labels, BlockReason]] = []
        self.families: list[list[str]] = []  # one shared weight's copies (tied_families), sliced alike
        self.tied: set[str] = set()  # every copy but the first (counted once)
        self.shapes = shapes
        self.initializers = {t.name: t for t in model.graph.initializer}
        self._const_cache: dict[str, NDArray[Any]] = {}
        self.pool = ElementPool()
        self.dims: dict[str, dict[int, Labels]] = defaultdict(dict)
        self.roles: dict[tuple[str, int], str] = {}
        self.consumes: list[Consume] = []
        self.blocks: list[tuple[Labels, BlockReason]] = []
        self.shape_values: dict[str, list[shapeflow.Entry]] = {}
        self.producer: dict[str, NodeProto] = {}
        self.users: dict[str, list[NodeProto]] = defaultdict(list)
        for node in model.graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.users[i].append(node)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, model: ModelProto, shapes: dict[str, tuple[int, ...]],
              approximate_norms: bool = False) -> DependencyGraph:
        g = cls(model, shapes, approximate_norms)
        for node in model.graph.node:
            g._analyze(node)
        for out in model.graph.output:
            g.block_tensor(out.name, BlockKind.GRAPH_OUTPUT, "graph output", out.name,
                           "graph outputs keep their shape")
        g._couple_tied()
        return g

    def _couple_tied(self) -> None:
        """Copies of one shared weight lose the same positions, so that they stay one tensor; an axis
        that one use keeps whole is kept by every use."""
        self.families = tied_families(self.model.graph)
        for family in self.families:
            self.tied.update(family[1:])
            for axis in range(self.rank(family[0])):
                labels = [self.dims[name].get(axis) for name in family]
                tracked = [la for la in labels if la is not None]
                if len(tracked) < len(labels):
                    for la in tracked:
                        self.pool.block(la)
                        self.blocks.append((la, BlockReason(BlockKind.FIXED_OPERAND, family[0], "shared weight",
                                                            f"'{family[0]}' is shared with a use that keeps axis "
                                                            f"{axis} whole")))
                for la in tracked[1:]:
                    self.union(tracked[0], la)

    def _analyze(self, node: NodeProto) -> None:
        rule = rule_for(node)
        self._block_captures(node)
        self._follow_shape_values(node)
        if rule is None:
            kind = FIXED_OPS_REASONS.get(node.op_type)
            if node.domain not in ("", "ai.onnx"):
                kind = BlockKind.CUSTOM_DOMAIN
            elif kind is None:
                kind = BlockKind.QUANTIZED if _is_quantized(node.op_type) else BlockKind.UNSUPPORTED_OP
            self.block_inputs(node, kind, f"no channel rule for {node.domain or 'ai.onnx'}.{node.op_type}")
            return
        snapshot = {o: dict(self.dims.get(o, {})) for o in node.output}
        try:
            rule.analyze(node, self)
        except (ShapeUnknown, Unmappable, ValueError, KeyError, IndexError) as exc:
            for o, d in snapshot.items():
                self.dims[o] = d
            kind = exc.kind if isinstance(exc, Unmappable) else (
                BlockKind.UNKNOWN_SHAPE if isinstance(exc, ShapeUnknown) else BlockKind.RULE_ERROR)
            detail = exc.detail if isinstance(exc, Unmappable) else f"{type(exc).__name__}: {exc}"
            self.block_inputs(node, kind, detail)

    def _follow_shape_values(self, node: NodeProto) -> None:
        """Propagate run-time shape provenance; a channel count read by anything we cannot follow
        (arithmetic, Range, ConstantOfShape...) is fixed from then on."""
        reads = [i for i in node.input if i in self.shape_values]
        if node.op_type != "Shape" and not reads:
            return
        kind, why = BlockKind.SHAPE_NOT_REWRITABLE, ""
        try:
            if node.op_type in shapeflow.PROPAGATING and shapeflow.propagate(node, self):
                return
        except ShapeUnknown as exc:  # not followed: what it reads is fixed, and a consumer must not rewrite it
            kind, why = BlockKind.UNKNOWN_SHAPE, f", and {exc}"
        if node.op_type in SHAPE_CONSUMERS and not why:
            return
        for name in reads:
            for ref in shapeflow.tracked_refs(self, self.shape_values[name]):
                self.block(self.tracked(ref.tensor)[ref.axis], kind, node,
                           f"computes with the run-time channel count of '{ref.tensor}' (axis {ref.axis}){why}")

    def _block_captures(self, node: NodeProto) -> None:
        """Tensors read inside If/Loop/Scan bodies are fixed: we never rewrite subgraphs."""
        for a in node.attribute:
            graphs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs)
            for sub in graphs:
                local = {o for n in sub.node for o in n.output} | {i.name for i in sub.input}
                local |= {t.name for t in sub.initializer}
                for n in sub.node:
                    for i in n.input:
                        if i and i not in local:
                            self.block_tensor(i, BlockKind.CONTROL_FLOW, node.op_type, node_name(node),
                                              f"'{i}' is read inside a {node.op_type} body")

    # ---- queries for rules --------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.initializers:
            return tuple(int(d) for d in self.initializers[name].dims)
        s = self.shapes.get(name)
        if s is None:
            producer = self.producer.get(name)
            where = f" ({node_label(producer)})" if producer is not None else ""
            raise ShapeUnknown(f"the shape of '{name}'{where} is unknown; {self._shape_fix}")
        return s

    @cached_property
    def _shape_fix(self) -> str:
        return input_shape_fix(self.model)

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def is_const(self, name: str) -> bool:
        return name in self.initializers

    def const(self, name: str) -> NDArray[Any]:
        """An initializer's value: cached when it is held in memory (every read of a proto copies it), a
        fresh view of its file when mapped, so that no mapping outlives the stage that reads it."""
        tensor = self.initializers[name]
        if is_mapped(tensor):
            return to_array(tensor)
        if name not in self._const_cache:
            self._const_cache[name] = to_array(tensor)
        return self._const_cache[name]

    def known_const(self, name: str) -> NDArray[Any] | None:
        """`const(name)` for an initializer of this model held in memory, else None: what onnxruntime
        sessions over the model share instead of copying every weight again (`runtime.session(arrays=...)`;
        mapped ones it maps from their files itself)."""
        tensor = self.initializers.get(name)
        return None if tensor is None or is_mapped(tensor) else self.const(name)

    def tracked(self, name: str) -> dict[int, Labels]:
        return self.dims.get(name, {})

    # ---- mutations for rules ------------------------------------------------------------------
    def new_space(self, node: NodeProto, tensor: str, size: int) -> Labels:
        return self.pool.new(size, node_name(node), tensor)

    def set_dim(self, name: str, axis: int, labels: Labels, role: str = "act") -> None:
        """Label (tensor, axis); if it is labelled already the two labellings are coupled."""
        rank = self.rank(name)
        axis = axis % rank if rank else axis
        size = self.shape(name)[axis]
        if labels.size != size:
            raise ValueError(f"'{name}' axis {axis} has {size} positions, labels have {labels.size}")
        old = self.dims[name].get(axis)
        if old is not None:
            self.pool.union(old, labels)
        else:
            self.dims[name][axis] = labels
        if self.is_const(name):
            self.roles[(name, axis)] = role

    def union(self, a: Labels, b: Labels) -> None:
        self.pool.union(a, b)

    def consume(self, node: NodeProto, index: int, axis: int) -> None:
        tensor = node.input[index]
        axis = axis % self.rank(tensor)
        if axis in self.tracked(tensor) and not self.is_const(tensor):
            self.consumes.append(Consume(node_name(node), index, tensor, axis))

    def block(self, labels: Labels, kind: BlockKind, node: NodeProto, detail: str) -> None:
        if labels.size:
            self.pool.block(labels)
            self.blocks.append((labels, BlockReason(kind, node_name(node), node.op_type, detail)))

    def approximate(self, labels: Labels, node: NodeProto, detail: str) -> None:
        """`labels` may be pruned, changing what `node` computes for the kept ones (approximate_norms)."""
        if labels.size:
            self.approximations.append((labels, BlockReason(BlockKind.NORMALIZES_CHANNELS, node_name(node),
                                                            node.op_type, detail)))

    def block_tensor(self, name: str, kind: BlockKind, op: str, node: str, detail: str) -> None:
        for labels in self.tracked(name).values():
            self.pool.block(labels)
            self.blocks.append((labels, BlockReason(kind, node, op, detail)))

    def block_inputs(self, node: NodeProto, kind: BlockKind, detail: str) -> None:
        for i in node.input:
            if i:
                self.block_tensor(i, kind, node.op_type, node_name(node), detail)


def _is_quantized(op: str) -> bool:
    return op.startswith(("QLinear", "Quantize", "Dequantize", "DynamicQuantize")) or op.endswith("Integer")
