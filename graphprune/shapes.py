"""Concrete shapes of every tensor for the chosen input shapes.

Rules reason about exact sizes (a Reshape's factorisation, a Concat's offsets). Shape inference with
the inputs fixed gives most of them; whatever it leaves unknown is read off one onnxruntime run, and
so is every shape of a model onnx's inference rejects but onnxruntime runs (`model.infer_view`).
"""

from __future__ import annotations

from onnx import ModelProto, ValueInfoProto

from graphprune import runtime
from graphprune.errors import REEXPORT, InvalidModelError, UsageError
from graphprune.inputs import InputSpec, fix_input_dims, make_feeds, signature
from graphprune.model import Inference, Uninferable, infer_view, inference_view
from graphprune.protowalk import node_label


class Shapes(dict[str, tuple[int, ...]]):
    """Tensor name -> concrete shape; `warnings` say which fallback resolving them took (for the
    report: shapes read off a run hold at the analysed input shapes only)."""

    def __init__(self) -> None:
        super().__init__()
        self.warnings: list[str] = []


def input_shape_fix(model: ModelProto) -> str:
    """The fix for a shape that cannot be resolved, spelled for the model's inputs with dynamic dims."""
    dynamic = [s for s in signature(model) if s.declared is None or not all(isinstance(d, int) for d in s.declared)]
    args = " ".join(f"--input-shape {s.name}={','.join(map(str, s.declared or ('D1', 'D2', '...')))}"
                    for s in dynamic)
    return f"give concrete shapes with {args or '--input-shape NAME=D1,D2,...'} (option input_shapes)"


def _concrete(vi: ValueInfoProto) -> tuple[int, ...] | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = vi.type.tensor_type.shape.dim
    if all(d.HasField("dim_value") for d in dims):
        return tuple(int(d.dim_value) for d in dims)
    return None


def resolve_shapes(model: ModelProto, specs: list[InputSpec]) -> Shapes:
    """Every tensor's shape at the input shapes `specs`, with warnings naming any fallback taken.

    A model that does not run there is a UsageError when its inputs have dynamic dims (the fix is
    other shapes), an InvalidModelError when onnx's inference rejects it too; otherwise what stays
    unknown (a model with static inputs onnxruntime cannot run) is blocked by the rules needing it."""
    view = fix_input_dims(inference_view(model), specs)  # no weight bytes copied or serialized
    try:
        inference = infer_view(view)
    except Uninferable as exc:
        if not _dynamic(specs):
            raise
        raise UsageError(f"the model does not run at input shapes {_at(specs)}: {exc.detail}; "
                         f"{input_shape_fix(model)}") from exc
    shapes = Shapes()
    g = inference.model.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        s = _concrete(vi)
        if s is not None:
            shapes[vi.name] = s
    for t in model.graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    produced = [o for n in g.node for o in n.output if o]
    lenient = inference.fallback == "lenient"
    missing = produced if lenient else [o for o in produced if o not in shapes]
    if missing:
        shapes.update(_run_for_shapes(model, specs, missing, inference))
    if inference.fallback == "unannotated":
        shapes.warnings.append(f"onnx shape inference rejected the shapes the model declares ({inference.error}); "
                               "they were ignored and inferred again from the nodes")
    elif lenient:
        shapes.warnings.append(f"onnx shape inference rejects the model ({inference.error}); every tensor's shape "
                               f"was read off one onnxruntime run at input shapes {_at(specs)}")
    return shapes


def _run_for_shapes(model: ModelProto, specs: list[InputSpec], names: list[str],
                    inference: Inference) -> dict[str, tuple[int, ...]]:
    try:
        sess = runtime.probe_session(fix_input_dims(model, specs), names)
        values = runtime.run(sess, make_feeds(specs), names)
    except Exception as exc:  # onnxruntime raises several unrelated types
        if inference.fallback == "lenient":
            problem = f"onnx shape inference rejects the model ({inference.error}) and onnxruntime cannot run it"
        else:
            producer = next(n for n in model.graph.node if names[0] in n.output)
            problem = (f"the shape of '{names[0]}' ({node_label(producer)}) is unknown to onnx shape inference "
                       "and onnxruntime cannot run the model")
        if _dynamic(specs):
            raise UsageError(f"{problem} at input shapes {_at(specs)}: {exc}; {input_shape_fix(model)}") from exc
        if inference.fallback == "lenient":
            raise InvalidModelError(f"{problem}: {exc}; fix the node named there or {REEXPORT}") from exc
        return {}  # the model's own (static) shapes: what stays unknown, rules block
    return {n: tuple(int(d) for d in v.shape) for n, v in values.items()}


def _dynamic(specs: list[InputSpec]) -> bool:
    """Whether some input shape was chosen (guessed or given) rather than declared by the model."""
    return any(s.source != "declared" for s in specs)


def _at(specs: list[InputSpec]) -> str:
    return ", ".join(f"{s.name}={list(s.shape)} ({s.source})" for s in specs)
