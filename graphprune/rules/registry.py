"""The one registry of op rules. A new op = one `@register` class + one small-graph test."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from onnx import NodeProto

from graphprune.protowalk import DEFAULT_DOMAINS

if TYPE_CHECKING:
    from graphprune.depgraph import DependencyGraph
    from graphprune.surgery import SurgeryContext

class Rule:
    """How one op family couples channels, rewrites its shape constants, and costs MACs.

    `analyze` labels the channel dimensions of outputs (and of constant operands it owns) from its
    inputs. It must never guess: what it cannot map exactly it blocks via `graph.block_*`.
    """

    def analyze(self, node: NodeProto, graph: DependencyGraph) -> None:
        raise NotImplementedError

    def rewrite(self, node: NodeProto, sx: SurgeryContext) -> None:
        """Fix attributes and shape constants after channels were removed (default: none)."""

    def macs(self, node: NodeProto, shape: Callable[[str], tuple[int, ...]]) -> int:
        """Multiply-accumulates of this node for the given tensor shapes (default: not counted)."""
        return 0


RULES: dict[str, Rule] = {}


def register(*op_types: str) -> Callable[[type[Rule]], type[Rule]]:
    def deco(cls: type[Rule]) -> type[Rule]:
        instance = cls()
        for op in op_types:
            if op in RULES:
                raise RuntimeError(f"op {op} registered twice")
            RULES[op] = instance
        return cls

    return deco


def rule_for(node: NodeProto) -> Rule | None:
    """The rule of a default-domain op, or None (the caller blocks what the node touches)."""
    if node.domain not in DEFAULT_DOMAINS:
        return None
    return RULES.get(node.op_type)
