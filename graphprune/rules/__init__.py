"""Op rules. Importing this package registers every rule module in `RULES`."""

from graphprune.rules import concat, conv, elementwise, layout, linear, norm, recurrent, reduce, spatial
from graphprune.rules.registry import RULES, Rule, register, rule_for

__all__ = ["RULES", "Rule", "concat", "conv", "elementwise", "layout", "linear", "norm", "recurrent",
           "reduce", "register", "rule_for", "spatial"]
