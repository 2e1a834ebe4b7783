"""Tie a shared weight's copies back into one tensor after surgery.

Normalization gives every use of an initializer its own copy (`normalize.tied_families`), the
dependency graph couples the copies so they lose the same positions, and compensation leaves
them alone; so after surgery they are still equal and one tensor can serve every use again, as
in the original file. Copies that recovery trained apart stay separate (and are counted).
"""

from __future__ import annotations

import numpy as np
from onnx import ModelProto

from graphprune.tensors import to_array


def retie(model: ModelProto, families: list[list[str]]) -> int:
    """Point every use of an unchanged-equal copy at the family's first tensor; returns how many
    copies were dropped."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    alias: dict[str, str] = {}
    for family in families:
        first = inits.get(family[0])
        if first is None:
            continue
        value = to_array(first)
        for name in family[1:]:
            copy = inits.get(name)
            if copy is not None and list(copy.dims) == list(first.dims) and copy.data_type == first.data_type \
                    and np.array_equal(to_array(copy), value):
                alias[name] = family[0]
    if not alias:
        return 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    for field in (graph.initializer, graph.input):  # IR < 4 lists initializers as inputs too
        keep = [t for t in field if t.name not in alias]
        del field[:]
        field.extend(keep)
    return len(alias)
