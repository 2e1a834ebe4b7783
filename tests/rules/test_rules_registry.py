"""Every registered op type of the big families (unary, broadcast, reduce, pool) passes channels the
same way, and every rule class of the registry is exercised by some test in this folder."""

from __future__ import annotations

import pathlib
import re

import pytest
from rules.helpers import Net, group_of, kinds, sandwich, units

import graphprune
from graphprune.reasons import BlockKind
from graphprune.rules import RULES
from graphprune.rules.elementwise import UNARY
from graphprune.rules.reduce import REDUCE
from graphprune.rules.spatial import POOLS

BOOL_OUT = {"IsNaN", "IsInf"}
NOT_FLOAT = {"Not", "BitwiseNot", "CastLike", "Cast", "Dropout"}  # other types or inputs: tested elsewhere
OPSET = {"Mish": 18, "Gelu": 20}


@pytest.mark.parametrize("op", sorted(set(UNARY) - NOT_FLOAT))
def test_every_float_unary_op_passes_channels(op: str) -> None:
    def build(n: Net, y: str) -> str:
        z = n.op(op, [y])
        return n.op("Cast", [z], to=1) if op in BOOL_OUT else z

    an = graphprune.analyze(sandwich(build, opset=OPSET.get(op, 17)))
    assert units(an, "q.w", 1) == units(an, "p.w", 0) and group_of(an, "p.w", 0).prunable


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Mod"])
def test_every_float_broadcast_op_couples_both_producers(op: str) -> None:
    def build(n: Net, y: str) -> str:
        other = n.conv("x", 3, 8, "a")
        attrs = {"fmod": 1} if op == "Mod" else {}
        return n.op(op, [y, other], **attrs)

    an = graphprune.analyze(sandwich(build))
    assert units(an, "a.w", 0) == units(an, "p.w", 0) == units(an, "q.w", 1)


@pytest.mark.parametrize("op", ["Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual"])
def test_every_comparison_couples_both_producers(op: str) -> None:
    an = graphprune.analyze(sandwich(lambda n, y: n.op("Cast", [n.op(op, [y, n.conv("x", 3, 8, "a")])], to=1)))
    assert units(an, "a.w", 0) == units(an, "p.w", 0) == units(an, "q.w", 1)


@pytest.mark.parametrize("op", REDUCE)
@pytest.mark.parametrize("axes", [[2, 3], [1]])
def test_every_reduction(op: str, axes: list[int]) -> None:
    m = sandwich(lambda n, y: n.op(op, [y, n.const("axes", axes)]), opset=18, q_in=8 if 1 not in axes else 1)
    an = graphprune.analyze(m)
    g = group_of(an, "p.w", 0)
    if 1 in axes:
        assert kinds(g) == {BlockKind.REDUCES_CHANNELS} and not g.prunable
    else:
        assert units(an, "q.w", 1) == units(an, "p.w", 0) and g.prunable


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("axis", [3, 1])
def test_every_arg_reduction(op: str, axis: int) -> None:
    m = sandwich(lambda n, y: n.op("Cast", [n.op(op, [y], axis=axis)], to=1), q_in=1 if axis == 1 else 8)
    an = graphprune.analyze(m)
    g = group_of(an, "p.w", 0)
    if axis == 1:
        assert kinds(g) == {BlockKind.REDUCES_CHANNELS}
    else:
        assert units(an, "q.w", 1) == units(an, "p.w", 0) and g.prunable


@pytest.mark.parametrize("op", POOLS)
def test_every_pool_passes_channels(op: str) -> None:
    attrs = {} if op.startswith("Global") else {"kernel_shape": [2, 2]}
    an = graphprune.analyze(sandwich(lambda n, y: n.op(op, [y], **attrs)))
    assert units(an, "q.w", 1) == units(an, "p.w", 0) and group_of(an, "p.w", 0).prunable


def test_every_rule_class_has_a_small_graph_test() -> None:
    """A rule counts as tested when one of its op types is built (as a quoted name) in a test here."""
    text = "\n".join(p.read_text() for p in pathlib.Path(__file__).parent.glob("test_rules_*.py"))
    built = set(re.findall(r'"([A-Z][A-Za-z]+)"', text))
    by_class: dict[str, set[str]] = {}
    for op, rule in RULES.items():
        by_class.setdefault(type(rule).__name__, set()).add(op)
    untested = sorted(name for name, ops in by_class.items() if not ops & built)
    assert not untested, f"rules without a small-graph test: {untested}"
