"""Typed reasons why channels cannot be pruned (shown in reports and `inspect`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from graphprune.errors import UsageError


class BlockKind(StrEnum):
    UNSUPPORTED_OP = "unsupported_op"
    CUSTOM_DOMAIN = "custom_domain"
    CONTROL_FLOW = "control_flow"
    RECURRENT = "recurrent"
    QUANTIZED = "quantized"
    GRAPH_OUTPUT = "graph_output"
    NORMALIZES_CHANNELS = "normalizes_over_channels"
    REDUCES_CHANNELS = "reduces_over_channels"
    FIXED_OPERAND = "coupled_with_fixed_channels"
    SHAPE_NOT_REWRITABLE = "shape_not_rewritable"
    UNKNOWN_SHAPE = "unknown_shape"
    LAYOUT = "unsupported_layout_change"
    EXCLUDED = "excluded_by_user"
    TOO_SMALL = "too_small"
    RULE_ERROR = "rule_error"


@dataclass(frozen=True)
class BlockReason:
    kind: BlockKind
    node: str
    op: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind.value} at {self.op} '{self.node}': {self.detail}"

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind.value, "node": self.node, "op": self.op, "detail": self.detail}


class ShapeUnknown(UsageError):
    """A rule needed a concrete shape that shape resolution could not provide.

    Analysis catches it and blocks what the rule touches (UNKNOWN_SHAPE); anywhere else it reaches
    the user as a usage error, its message naming the tensor, its producer and the fix (input shapes)."""


class Unmappable(Exception):
    """A rule found a channel mapping it cannot express exactly; carries the block kind."""

    def __init__(self, kind: BlockKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
