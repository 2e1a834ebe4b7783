"""Apply a plan to a copy of the model: slice every labelled parameter dimension, let each op's rule
rewrite its attributes and shape constants, then drop stale shape annotations.

A model whose weights are mapped from files (`weights`) gets its new weights written to a scratch
file as they are made, and its unchanged large ones copied there, so at no point does the pruned
model's data sit in memory, and it lives in one folder that onnxruntime maps.

Also builds the masked reference model (the original with every consumer's removed input channels
zeroed) that the pruned model must reproduce exactly when no compensation is applied.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from graphprune import weights
from graphprune.depgraph import DependencyGraph
from graphprune.model import infer_shapes, without_initializers
from graphprune.rules import rule_for
from graphprune.weights import Spill, is_mapped, map_array


class SurgeryContext:
    def __init__(self, graph: DependencyGraph, removed_root: NDArray[np.bool_], spill: Spill | None = None) -> None:
        self.graph = graph
        self.removed = removed_root[graph.pool.roots()]
        self.consts: dict[str, NDArray[Any]] = {}
        self.added: dict[str, NDArray[Any]] = {}
        self.spill = spill
        self.spilled: dict[str, TensorProto] = {}  # new values already written to `spill`

    def keep(self, name: str, axis: int) -> NDArray[np.bool_] | None:
        labels = self.graph.tracked(name).get(axis)
        return None if labels is None else ~self.removed[labels]

    def old_shape(self, name: str) -> tuple[int, ...]:
        return self.graph.shape(name)

    def new_shape(self, name: str) -> tuple[int, ...]:
        shape = list(self.graph.shape(name))
        for axis, labels in self.graph.tracked(name).items():
            shape[axis] = int((~self.removed[labels]).sum())
        return tuple(shape)

    def touches(self, node: NodeProto) -> bool:
        """Whether any tensor of `node` loses channels (only those nodes need rewriting)."""
        return any(
            bool(self.removed[labels].any())
            for name in [*node.input, *node.output] if name
            for labels in self.graph.tracked(name).values()
        )

    def const(self, name: str) -> NDArray[Any]:
        if name in self.consts:
            return self.consts[name]
        return self.added[name] if name in self.added else self.graph.const(name)

    def set_const(self, name: str, value: NDArray[Any]) -> None:
        self.spilled.pop(name, None)
        if self.spill is not None and value.nbytes >= weights.MAP_MIN_BYTES and value.dtype.kind in "biufcb":
            self.spilled[name] = self.spill.tensor(name, value)
            value = map_array(self.spilled[name])  # the written copy: the array itself can go
        self.consts[name] = value

    def add_const(self, base: str, value: NDArray[Any], dtype: int = TensorProto.INT64) -> str:
        name, k = base, 0
        while name in self.graph.initializers or name in self.added or name in self.graph.shapes:
            k += 1
            name = f"{base}_{k}"
        self.added[name] = value.astype(helper.tensor_dtype_to_np_dtype(dtype))
        return name


def apply_plan(graph: DependencyGraph, removed_root: NDArray[np.bool_],
               overrides: dict[str, NDArray[Any]] | None = None) -> ModelProto:
    """The pruned model, shapes re-inferred; `overrides` replace initializer values first (compensated
    weights)."""
    model = without_initializers(graph.model)  # initializers are written once, sliced or as they were
    mapped = any(is_mapped(t) for t in graph.model.graph.initializer)
    spill = Spill() if mapped else None
    sx = SurgeryContext(graph, removed_root, spill)
    overrides = overrides or {}
    for name in graph.initializers:
        value = overrides.get(name)
        changed = value is not None
        if value is None:
            value = graph.const(name)
        for axis in graph.tracked(name):
            keep = sx.keep(name, axis)
            if keep is not None and not keep.all():
                value = np.compress(keep, value, axis=axis)
                changed = True
        if changed:
            sx.set_const(name, value)
        del value
    for node in model.graph.node:
        rule = rule_for(node)
        if rule is not None and sx.touches(node):
            rule.rewrite(node, sx)
    _write_consts(graph.model, model, sx)
    if spill is not None:
        spill.close()
    del model.graph.value_info[:]
    return infer_shapes(model, copy=False)


def _write_consts(source: ModelProto, model: ModelProto, sx: SurgeryContext) -> None:
    inits = model.graph.initializer
    for t in source.graph.initializer:
        if t.name in sx.spilled:
            inits.append(sx.spilled[t.name])
        elif t.name in sx.consts:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(sx.consts[t.name]), t.name))
        elif sx.spill is not None and is_mapped(t):
            inits.append(sx.spill.copied(t))
        else:
            inits.append(t)
    for name, value in sx.added.items():
        inits.append(numpy_helper.from_array(value, name))


def masked_reference(graph: DependencyGraph, removed_root: NDArray[np.bool_],
                     dtypes: dict[str, int]) -> ModelProto:
    """The original model with each consumer's inputs multiplied by a 0/1 mask of kept channels, and
    without the original's weights: it runs on them with `runtime.session(..., weights=original)`,
    so validation does not hold a second copy of every weight."""
    model = without_initializers(graph.model)
    sx = SurgeryContext(graph, removed_root)
    nodes = {(n.name or n.output[0]): n for n in model.graph.node}
    new_nodes: dict[str, list[Any]] = {}
    for k, c in enumerate(graph.consumes):
        keep = sx.keep(c.tensor, c.axis)
        if keep is None or keep.all():
            continue
        rank = len(graph.shape(c.tensor))
        np_dtype = helper.tensor_dtype_to_np_dtype(dtypes.get(c.tensor, TensorProto.FLOAT))
        mask = keep.astype(np_dtype).reshape([-1] + [1] * (rank - 1 - c.axis))
        mask_name, out_name = f"__gp_mask_{k}", f"__gp_masked_{k}"
        model.graph.initializer.append(numpy_helper.from_array(mask, mask_name))
        new_nodes.setdefault(c.node, []).append(helper.make_node("Mul", [c.tensor, mask_name], [out_name]))
        nodes[c.node].input[c.index] = out_name
    if new_nodes:
        ordered = []
        for n in model.graph.node:
            ordered.extend(new_nodes.get(n.name or n.output[0], []))
            ordered.append(n)
        del model.graph.node[:]
        model.graph.node.extend(ordered)
    return model
