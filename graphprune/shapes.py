"""Concrete shapes of every tensor for the chosen input shapes.

Rules reason about exact sizes (a Reshape's factorisation, a Concat's offsets). Shape inference with
the inputs fixed gives most of them; whatever it leaves unknown is read off one onnxruntime run.
"""

from __future__ import annotations

import onnx
from onnx import ModelProto, ValueInfoProto

from graphprune import runtime
from graphprune.inputs import InputSpec, fix_input_dims, make_feeds
from graphprune.model import inference_view


def _concrete(vi: ValueInfoProto) -> tuple[int, ...] | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = vi.type.tensor_type.shape.dim
    if all(d.HasField("dim_value") for d in dims):
        return tuple(int(d.dim_value) for d in dims)
    return None


def resolve_shapes(model: ModelProto, specs: list[InputSpec]) -> dict[str, tuple[int, ...]]:
    view = fix_input_dims(inference_view(model), specs)  # no weight bytes copied or serialized
    try:
        inferred = onnx.shape_inference.infer_shapes(view, strict_mode=False, data_prop=True)
    except Exception:  # inference is an optimisation here; the run below covers what it misses
        inferred = view
    shapes: dict[str, tuple[int, ...]] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        s = _concrete(vi)
        if s is not None:
            shapes[vi.name] = s
    for t in model.graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    missing = [o for n in g.node for o in n.output if o and o not in shapes]
    if missing:
        shapes.update(_run_for_shapes(fix_input_dims(model, specs), specs, missing))
    return shapes


def _run_for_shapes(model: ModelProto, specs: list[InputSpec], names: list[str]) -> dict[str, tuple[int, ...]]:
    try:
        sess = runtime.probe_session(model, names)
        values = runtime.run(sess, make_feeds(specs), names)
    except Exception:  # an unrunnable model keeps those shapes unknown: rules block them
        return {}
    return {n: tuple(int(d) for d in v.shape) for n, v in values.items()}
