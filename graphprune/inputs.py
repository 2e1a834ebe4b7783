"""Synthetic inputs from a model's input signature: dynamic dims get defaults, integer inputs stay
in a safe range (token ids below the embedding table size, masks all ones)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto, helper

from graphprune.errors import UsageError

DEFAULT_BATCH = 2
DEFAULT_DIM = 32  # divisible by the stride of most CNNs; small enough for short sequences


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    high: int  # exclusive upper bound for integer inputs

    @property
    def image_like(self) -> bool:
        """A float [N, C <= 4, H, W] input with some spatial extent: synthetic images and image
        augmentations (shifts) apply to it."""
        s = self.shape
        return np.issubdtype(self.dtype, np.floating) and len(s) == 4 and s[1] <= 4 and min(s[2:]) >= 4


def signature(model: ModelProto, overrides: dict[str, tuple[int, ...]] | None = None) -> list[InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise UsageError(f"input '{inp.name}' is not a tensor; graphprune needs tensor inputs")
        if overrides and inp.name in overrides:
            shape = tuple(int(d) for d in overrides[inp.name])
        else:
            shape = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                else (DEFAULT_BATCH if i == 0 else DEFAULT_DIM)
                for i, d in enumerate(tt.shape.dim)
            )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        specs.append(InputSpec(inp.name, shape, dtype, _int_bound(model, inp.name)))
    return specs


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
