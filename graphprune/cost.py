"""Parameters, MACs and bytes of a model, before or after a set of units is removed.

MACs come from each op's rule (Conv, Gemm, MatMul...); evaluating them on shrunken shapes makes
the params/FLOPs targets exact rather than first-order estimates.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto, helper

from graphprune.depgraph import DependencyGraph
from graphprune.reasons import ShapeUnknown
from graphprune.rules import rule_for
from graphprune.tensors import tensor_nbytes


class CostModel:
    def __init__(self, graph: DependencyGraph, roots: NDArray[np.int64]) -> None:
        self.graph = graph
        self._dims = [(t, a, roots[lab]) for t, axes in graph.dims.items() for a, lab in axes.items()]
        self._itemsize = {
            t.name: np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            for t in graph.model.graph.initializer
        }

    def shape_fn(self, removed_root: NDArray[np.bool_] | None) -> Callable[[str], tuple[int, ...]]:
        new: dict[str, list[int]] = {}
        if removed_root is not None:
            for tensor, axis, roots in self._dims:
                kept = int((~removed_root[roots]).sum())
                if kept != roots.size:
                    new.setdefault(tensor, list(self.graph.shape(tensor)))[axis] = kept

        def shape(name: str) -> tuple[int, ...]:
            return tuple(new[name]) if name in new else self.graph.shape(name)

        return shape

    def params(self, removed_root: NDArray[np.bool_] | None = None) -> int:
        shape = self.shape_fn(removed_root)
        return sum(math.prod(shape(n)) for n in self.graph.initializers if n not in self.graph.tied)

    def bytes(self, removed_root: NDArray[np.bool_] | None = None) -> int:
        shape = self.shape_fn(removed_root)
        return sum(math.prod(shape(n)) * self._itemsize[n] for n in self.graph.initializers if n not in self.graph.tied)

    def macs(self, removed_root: NDArray[np.bool_] | None = None) -> int:
        shape = self.shape_fn(removed_root)
        total = 0
        for node in self.graph.model.graph.node:
            rule = rule_for(node)
            if rule is None:
                continue
            try:
                total += rule.macs(node, shape)
            except (ShapeUnknown, IndexError):
                continue
        return total


def stored(model: ModelProto) -> tuple[int, int]:
    """(parameters, bytes) of the initializers `model` holds: what a pruned model really stores once
    compensation, recovery and the clean-up passes have rewritten it (the plan's count predicts it)."""
    inits = model.graph.initializer
    return sum(math.prod(t.dims) for t in inits), sum(tensor_nbytes(t) for t in inits)
