"""Small ONNX helpers shared by rules, surgery and reports."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import AttributeProto, NodeProto, helper


def attr(node: NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                return a
            return helper.get_attribute_value(a)
    return default


def set_attr(node: NodeProto, name: str, value: Any) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def node_name(node: NodeProto) -> str:
    """Stable display name of a node (its name, else its first output)."""
    return node.name or (node.output[0] if node.output else node.op_type)


def ints(values: NDArray[Any] | list[int]) -> list[int]:
    return [int(v) for v in np.asarray(values).reshape(-1)]
