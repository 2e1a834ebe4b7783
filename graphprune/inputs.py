"""Synthetic inputs from a model's input signature: dynamic dims get defaults, integer inputs stay
in a safe range (token ids below the embedding table size, masks all ones).

Each input's shape says where it came from ("declared" in the model, "given" by the user, or
"guessed": a dynamic dim filled with a default), because every number a report holds (statistics,
fidelity, latency) was measured at that shape; user-given shapes are checked against the model here,
before any analysis, so a typo is a usage error rather than a failure blamed on the pruned model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto, ValueInfoProto, helper

from graphprune.errors import UsageError

DEFAULT_BATCH = 2
DEFAULT_DIM = 32  # divisible by the stride of most CNNs; small enough for short sequences
Dim = int | str  # a declared dim: its size, or its symbol ("?" where it has neither)


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    high: int  # exclusive upper bound for integer inputs
    source: str = "declared"  # "declared" (static in the model), "given" (input_shapes) or "guessed"
    declared: tuple[Dim, ...] | None = None  # the model's own dims; None: it declares no shape

    @property
    def guessed(self) -> list[int]:
        """The axes filled with a default (none unless `source` is "guessed")."""
        if self.source != "guessed" or self.declared is None:
            return []
        return [i for i, d in enumerate(self.declared) if not isinstance(d, int)]

    @property
    def image_like(self) -> bool:
        """A float [N, C <= 4, H, W] input with some spatial extent: synthetic images and image
        augmentations (shifts) apply to it."""
        s = self.shape
        return np.issubdtype(self.dtype, np.floating) and len(s) == 4 and s[1] <= 4 and min(s[2:]) >= 4


def signature(model: ModelProto, overrides: dict[str, tuple[int, ...]] | None = None) -> list[InputSpec]:
    """The model's data inputs at concrete shapes: `overrides` where given (checked against the
    declared shape), else the declared dims with dynamic ones filled by defaults."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [inp for inp in model.graph.input if inp.name not in inits]
    overrides = overrides or {}
    unknown = sorted(set(overrides) - {inp.name for inp in inputs})
    if unknown:
        listed = ", ".join(f"{inp.name} {_show(_declared(inp))}" for inp in inputs)
        raise UsageError(f"input_shapes (--input-shape) name(s) {unknown} that are not inputs of the model; "
                         f"its inputs are: {listed}")
    specs = []
    for inp in inputs:
        if not inp.type.HasField("tensor_type"):
            raise UsageError(f"input '{inp.name}' is not a tensor; graphprune needs tensor inputs")
        declared = _declared(inp)
        if inp.name in overrides:
            shape = tuple(int(d) for d in overrides[inp.name])
            _check_given(inp.name, shape, declared)
            source = "given"
        else:
            shape = tuple(d if isinstance(d, int) else DEFAULT_BATCH if i == 0 else DEFAULT_DIM
                          for i, d in enumerate(declared or ()))
            source = "declared" if declared is not None and all(isinstance(d, int) for d in declared) else "guessed"
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))
        specs.append(InputSpec(inp.name, shape, dtype, _int_bound(model, inp.name), source, declared))
    return specs


def _declared(inp: ValueInfoProto) -> tuple[Dim, ...] | None:
    tt = inp.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else d.dim_param or "?"
                 for d in tt.shape.dim)


def _show(dims: tuple[Dim, ...] | None) -> str:
    return "[" + ", ".join(map(str, dims)) + "]" if dims is not None else "(no declared shape)"


def _check_given(name: str, shape: tuple[int, ...], declared: tuple[Dim, ...] | None) -> None:
    """A given shape must fit the declared one: onnxruntime refuses any other, and only later, when
    the pruned model is validated, where the failure would look like the pruner's."""
    if declared is None:
        return
    given = f"--input-shape {name}={','.join(map(str, shape))} (option input_shapes)"
    if len(shape) != len(declared):
        raise UsageError(f"{given} has rank {len(shape)}, but the model declares '{name}' with rank "
                         f"{len(declared)}: {_show(declared)}")
    fixed = [f"dim {i} is {d}" for i, (d, g) in enumerate(zip(declared, shape, strict=True))
             if isinstance(d, int) and d != g]
    if fixed:
        raise UsageError(f"{given} contradicts the model's declared shape {_show(declared)} of '{name}': "
                         f"{', '.join(fixed)}; only its dynamic dims can be chosen")


def shape_warnings(specs: list[InputSpec]) -> list[str]:
    """One warning per input whose shape was partly guessed: every measured number depends on it."""
    out = []
    for s in specs:
        if s.source != "guessed":
            continue
        if s.declared is None:
            out.append(f"input '{s.name}' declares no shape and was run as a scalar; give its real shape with "
                       f"--input-shape {s.name}=D1,D2,... (option input_shapes)")
            continue
        dims = ", ".join(f"{i} ({s.declared[i]}) = {s.shape[i]}" for i in s.guessed)
        fix = ",".join(f"D{i}" if d == "?" else str(d) for i, d in enumerate(s.declared))
        out.append(f"input '{s.name}' has dynamic dims that were guessed: {dims}; the model was analysed and "
                   f"timed at shape {list(s.shape)}. Give the real shape with --input-shape {s.name}={fix} "
                   f"(option input_shapes)")
    return out


def _int_bound(model: ModelProto, name: str) -> int:
    """Token ids must index every table they feed; masks and type ids stay 0/1."""
    sizes = {t.name: list(t.dims) for t in model.graph.initializer}
    bounds = []
    frontier = {name}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in frontier:
            if node.input[0] in sizes and sizes[node.input[0]]:
                bounds.append(int(sizes[node.input[0]][0]))
        elif node.op_type in ("Cast", "Identity", "Unsqueeze", "Reshape", "Flatten") and node.input[0] in frontier:
            frontier.add(node.output[0])
    return min(bounds) if bounds else 2


def make_feeds(specs: list[InputSpec], seed: int = 0) -> dict[str, NDArray[Any]]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, NDArray[Any]] = {}
    for spec in specs:
        if spec.dtype == np.bool_:
            feeds[spec.name] = np.ones(spec.shape, dtype=bool)
        elif np.issubdtype(spec.dtype, np.integer):
            if "mask" in spec.name.lower():
                feeds[spec.name] = np.ones(spec.shape, dtype=spec.dtype)
            else:
                feeds[spec.name] = rng.integers(0, spec.high, size=spec.shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
    return feeds


def fix_input_dims(model: ModelProto, specs: list[InputSpec]) -> ModelProto:
    """A copy whose graph inputs have the concrete shapes of `specs` (for shape inference)."""
    fixed = ModelProto()
    fixed.CopyFrom(model)
    by_name = {s.name: s for s in specs}
    for inp in fixed.graph.input:
        spec = by_name.get(inp.name)
        if spec is None:
            continue
        dims = inp.type.tensor_type.shape.dim
        for d, v in zip(dims, spec.shape, strict=False):
            d.Clear()
            d.dim_value = v
    return fixed


def read_arrays(path: str, specs: list[InputSpec]) -> dict[str, NDArray[Any]]:
    """One array per model input from an .npz, batch-first, all with the same number of rows."""
    try:
        with np.load(path) as data:
            missing = [s.name for s in specs if s.name not in data.files]
            if missing:
                raise UsageError(f"calibration file {path!r} lacks arrays for input(s) {missing}; it has {data.files}")
            arrays = {s.name: np.asarray(data[s.name]).astype(s.dtype, copy=False) for s in specs}
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read calibration file {path!r}: {exc}; expected an .npz of input arrays") from exc
    rows = {k: v.shape[0] if v.ndim else 0 for k, v in arrays.items()}
    if len(set(rows.values())) != 1 or min(rows.values()) < 1:
        raise UsageError(f"calibration file {path!r}: every input array needs the same number of rows "
                         f"(batch-first, at least one), got {rows}")
    return arrays
