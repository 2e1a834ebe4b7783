"""Coupling helpers shared by several rule families."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import NodeProto

from graphprune import shapeflow
from graphprune.elements import Labels
from graphprune.reasons import BlockKind, Unmappable

if TYPE_CHECKING:
    from graphprune.depgraph import DependencyGraph


def passthrough(g: DependencyGraph, src: str, dst: str) -> None:
    """`dst` has `src`'s channels on the same axes (activations, casts, pooling...)."""
    for axis, labels in g.tracked(src).items():
        g.set_dim(dst, axis, labels)


def remap(g: DependencyGraph, src: str, dst: str, mapping: dict[int, int], why: str) -> None:
    """Move tracked axes by `mapping`; a tracked axis with no image cannot be followed exactly."""
    for axis, labels in g.tracked(src).items():
        if axis not in mapping:
            raise Unmappable(BlockKind.LAYOUT, f"{why} (channel axis {axis} of '{src}')")
        g.set_dim(dst, mapping[axis], labels)


def couple_broadcast(
    node: NodeProto, g: DependencyGraph, names: list[str], out: str, trailing: int = 0,
    skip: frozenset[int] = frozenset(),
) -> None:
    """Numpy-broadcasting coupling: operands aligned on an output axis share their channels.

    A constant operand that spans the channels (per-channel bias/scale) is labelled so surgery
    slices it; a non-constant operand with fixed channels there blocks the tracked ones.
    `trailing` excludes that many last axes of every operand (MatMul's matrix dims); `skip` excludes
    output axes handled by the caller (Concat's axis).
    """
    out_rank = g.rank(out) - trailing
    operands = [n for n in names if n]
    for j in range(out_rank):
        if j in skip:
            continue
        tracked: list[Labels] = []
        consts: list[tuple[str, int]] = []
        fixed: list[str] = []
        for name in operands:
            rank = g.rank(name) - trailing
            axis = j - (out_rank - rank)
            if axis < 0:
                continue
            labels = g.tracked(name).get(axis)
            size = g.shape(name)[axis]
            if size == 1 and g.shape(out)[j] != 1:
                if labels is not None:
                    g.block(labels, BlockKind.FIXED_OPERAND, node, f"single channel of '{name}' is broadcast")
                continue
            if labels is not None:
                tracked.append(labels)
            elif g.is_const(name):
                consts.append((name, axis))
            elif (source := _expanded_constant(g, name, axis)) is not None:
                consts.extend([source, (name, axis)])  # the constant is sliced, the Expand follows it
            else:
                fixed.append(name)
        if not tracked:
            continue
        if fixed:
            for labels in tracked:
                g.block(labels, BlockKind.FIXED_OPERAND, node, f"coupled with fixed channels of '{fixed[0]}'")
            continue
        base = tracked[0]
        for other in tracked[1:]:
            g.union(base, other)
        for name, axis in consts:
            g.set_dim(name, axis, base, role="const" if g.is_const(name) else "act")
        g.set_dim(out, j, base)


def _expanded_constant(g: DependencyGraph, name: str, axis: int) -> tuple[str, int] | None:
    """(the constant, its axis) when `name` is that constant Expanded to a run-time shape whose entry
    on `axis` keeps the constant's size (a class token expanded to the batch): such an operand can
    be sliced like the constant itself, and the Expand's shape entry is rewritten if it is stored."""
    node = g.producer.get(name)
    if node is None or node.op_type != "Expand" or not g.is_const(node.input[0]):
        return None
    src, rank = node.input[0], g.rank(name)
    src_axis = axis - (rank - g.rank(src))
    values = shapeflow.entries(g, node.input[1])
    if src_axis < 0 or values is None or g.shape(src)[src_axis] != g.shape(name)[axis]:
        return None
    entry = values[axis - (rank - len(values))] if axis >= rank - len(values) else shapeflow.Known(1)
    kept = isinstance(entry, shapeflow.Known | shapeflow.ConstRef) and entry.value in (1, g.shape(name)[axis])
    return (src, src_axis) if kept else None


def block_axis(labels: Labels, sizes: list[int]) -> int | None:
    """The one axis of `labels` viewed as `sizes` along which they change, if only one does."""
    view = labels.reshape(sizes)
    varying = [k for k in range(len(sizes)) if not np.array_equal(view, np.take(view, [0], axis=k).repeat(sizes[k], k))]
    return varying[0] if len(varying) == 1 else None


def union_blocks(g: DependencyGraph, labels: Labels, block: int) -> Labels:
    """Fuse each run of `block` consecutive positions into one unit; returns one label per run."""
    if block > 1:
        firsts = labels[::block]
        g.union(labels, np.repeat(firsts, block))
        return firsts
    return labels


def axes_of(node: NodeProto, g: DependencyGraph, input_index: int, attr_name: str = "axes") -> list[int] | None:
    """Axes given as an attribute (old opsets) or a constant input (new opsets); None if absent."""
    from graphprune.onnxutil import attr, ints

    value = attr(node, attr_name)
    if value is not None:
        return [int(v) for v in value]
    if len(node.input) > input_index and node.input[input_index]:
        name = node.input[input_index]
        if not g.is_const(name):
            raise Unmappable(BlockKind.SHAPE_NOT_REWRITABLE, f"{attr_name} '{name}' is not a constant")
        return ints(g.const(name))
    return None
