"""Tiny-graph builders and coupling readers for the op-rule tests.

`Net` builds an ONNX model in a few lines (random, seeded float32 weights; each node's output is
named after the node); `units`/`group_of` read which group and unit each position of a tensor axis landed in;
`pruned` + `kept` check a prune against the ORIGINAL weights, by matching values, so they do not
trust the labels they are meant to test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import ModelProto, TensorProto, helper, numpy_helper

import graphprune
from graphprune.api import Analysis
from graphprune.groups import Group
from graphprune.reasons import BlockKind

Dims = Sequence[int | str | None]
Unit = tuple[int, int]  # (group id, unit index within the group)


class Net:
    """A graph under construction: `w`/`const` add initializers, `op` adds a node and returns its output."""

    def __init__(self, opset: int = 17, seed: int = 0, extra_opsets: dict[str, int] | None = None) -> None:
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.extra_opsets = extra_opsets or {}
        self._count = 0

    def input(self, name: str, shape: Dims, dtype: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def w(self, name: str, shape: Sequence[int]) -> str:
        """A random float32 weight (values distinct, so pruned slices can be matched back)."""
        value = self.rng.standard_normal(tuple(shape)).astype(np.float32)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def const(self, name: str, values: Any, dtype: Any = np.int64) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, name: str | None = None,
           domain: str = "", **attrs: Any) -> Any:
        """Add a node; returns its output name (or the list of names when it has several)."""
        self._count += 1
        name = name or f"{op_type.lower()}{self._count}"
        outs = [f"{name}_out{i}" if i else name for i in range(outputs)] if isinstance(outputs, int) \
            else list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def conv(self, x: str, cin: int, cout: int, name: str, k: int = 1, dims: int = 2, group: int = 1,
             bias: bool = True, op: str = "Conv", **attrs: Any) -> str:
        """Conv (or ConvTranspose via `op`) with weight `{name}.w` and bias `{name}.b`; stride 1, 'same'."""
        if op == "Conv":
            shape = [cout, cin // group, *[k] * dims]
        else:
            shape = [cin, cout // group, *[k] * dims]
        ins = [x, self.w(f"{name}.w", shape)]
        if bias:
            ins.append(self.w(f"{name}.b", [cout]))
        pads = [(k - 1) // 2] * (2 * dims)
        return self.op(op, ins, name=name, group=group, kernel_shape=[k] * dims, pads=pads, **attrs)

    def output(self, *names: str, shape: Dims | None = None) -> None:
        """Graph outputs; their shape is inferred unless given (ops onnx cannot infer need it)."""
        for n in names:
            self.outputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, shape))

    def model(self, check: bool = True) -> ModelProto:
        opsets = [helper.make_opsetid("", self.opset)]
        opsets += [helper.make_opsetid(d, v) for d, v in self.extra_opsets.items()]
        graph = helper.make_graph(self.nodes, "t", self.inputs, [], self.inits)
        inferred = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=opsets, ir_version=10))
        types = {vi.name: vi for vi in inferred.graph.value_info}
        for out in self.outputs:
            inferred_out = types.get(out.name)
            if not out.type.tensor_type.HasField("shape"):
                assert inferred_out is not None and inferred_out.type.tensor_type.HasField("shape"), \
                    f"onnx cannot infer the shape of output '{out.name}': pass it to output()"
                out = inferred_out
            graph.output.append(out)
        model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
        if check:
            onnx.checker.check_model(model)
        return model


# ---- reading the coupling ------------------------------------------------------------------------


def units(an: Analysis, tensor: str, axis: int) -> list[Unit]:
    """(group id, unit) of every position of `tensor` axis `axis`; fails if that dim is not tracked."""
    tracked = an.graph.tracked(tensor)
    assert axis in tracked, f"{tensor} axis {axis} is not tracked (tracked: {sorted(tracked)})"
    roots = an.grouping.roots[tracked[axis]]
    return [an.grouping.unit_group[int(r)] for r in roots]


def group_of(an: Analysis, tensor: str, axis: int, position: int = 0) -> Group:
    gid, _ = units(an, tensor, axis)[position]
    return an.grouping.groups[gid]


def unit_index(an: Analysis, tensor: str, axis: int) -> list[int]:
    """The unit index of every position, asserting they all lie in one group."""
    us = units(an, tensor, axis)
    assert len({g for g, _ in us}) == 1, f"{tensor} axis {axis} spans several groups: {us}"
    return [u for _, u in us]


def params(group: Group) -> set[tuple[str, int, str]]:
    """(tensor, axis, role) of every parameter dimension holding positions of the group."""
    return {(m.tensor, m.axis, m.role) for m in group.members if m.is_param}


def kinds(group: Group) -> set[BlockKind]:
    return {r.kind for r in group.reasons}


def repeat_each(seq: Sequence[Any], n: int) -> list[Any]:
    """[a, b] -> [a]*n + [b]*n: what a channel looks like after being flattened with n positions."""
    return [x for x in seq for _ in range(n)]


# ---- pruning -------------------------------------------------------------------------------------


def pruned(model: ModelProto, **overrides: Any) -> graphprune.PruneResult:
    """Prune at 50% and insist that the library's own equivalence check ran and passed. BatchNorms are
    not folded: the tests find each parameter's kept slices by value."""
    kw: dict[str, Any] = {"sparsity": 0.5, "latency_runs": 0, "compensate": "none", "fold_bn": False, **overrides}
    res = graphprune.prune(model, **kw)
    assert res.report.validation["equivalence"]["passed"]
    assert res.plan.removed, "nothing was pruned"
    return res


def arrays(model: ModelProto) -> dict[str, NDArray[Any]]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def kept(orig: NDArray[Any], new: NDArray[Any], axis: int, **others: Sequence[int]) -> list[int]:
    """Indices of `orig` along `axis` that survive in `new`, found by value.

    `others` ("axis1"=indices...) first selects what is known to be kept on other axes. Asserts
    that `new` is exactly `orig` restricted to those indices, in order.
    """
    ref = orig
    for key, idx in others.items():
        ref = np.take(ref, list(idx), axis=int(key.removeprefix("axis")))
    assert ref.ndim == new.ndim and all(
        a == b for i, (a, b) in enumerate(zip(ref.shape, new.shape, strict=True)) if i != axis
    ), f"shape {new.shape} does not fit {ref.shape} outside axis {axis}"
    ref_slices = np.moveaxis(ref, axis, 0).reshape(ref.shape[axis], -1)
    new_slices = np.moveaxis(new, axis, 0).reshape(new.shape[axis], -1)
    found: list[int] = []
    for s in new_slices:
        hits = [i for i in range(len(ref_slices)) if i not in found and np.array_equal(ref_slices[i], s)]
        assert hits, "a pruned slice matches no original slice"
        found.append(hits[0])
    assert found == sorted(found), f"kept slices were reordered: {found}"
    return found


# ---- the common shape of most tests: producer conv -> op(s) under test -> consumer conv -------------


def sandwich(between: Callable[[Net, str], str], c: int = 8, shape: Dims = (1, 3, 4, 4), opset: int = 17,
             q_in: int | None = None, q_dims: int | None = None) -> ModelProto:
    """x -> Conv 'p' (c channels) -> between(net, y) -> Conv 'q' (3 channels) -> graph output.

    'p' is the producer whose channels the op under test must pass on, couple or block; 'q' reads
    them (weight 'q.w' axis 1). `q_in`/`q_dims` describe q's input when the op changes them.
    """
    n = Net(opset)
    dims, cin = len(shape) - 2, shape[1]
    assert isinstance(cin, int), "x's channels must be static"
    y = n.conv(n.input("x", shape), cin, c, "p", dims=dims)
    y = between(n, y)
    q_dims = q_dims or dims
    n.output(n.conv(y, q_in or c, 3, "q", dims=q_dims), shape=[None] * (q_dims + 2))
    return n.model()
