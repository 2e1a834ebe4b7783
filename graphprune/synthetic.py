"""Synthetic inputs in a model's own input domain, for data-free statistics.

Plain uniform noise is the worst source of layer statistics measured here (it collapses inverted
residuals); smooth random fields look more like images to a conv net. Token ids stay below the
embedding size and masks stay all ones. Batches are generated lazily so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto

from graphprune.inputs import InputSpec, make_feeds

KINDS = ("blobs", "gaussian")


def dynamic_batch(model: ModelProto) -> bool:
    """Whether every graph input's first dim is symbolic (so any batch size runs)."""
    inits = {t.name for t in model.graph.initializer}
    dims = [i.type.tensor_type.shape.dim for i in model.graph.input if i.name not in inits]
    return all(len(d) > 0 and not d[0].HasField("dim_value") for d in dims)


def _smooth(rng: np.random.Generator, shape: tuple[int, ...]) -> NDArray[np.float64]:
    """Low-frequency random fields in [0, 1]: coarse noise, bilinearly upsampled, squashed."""
    n, c, *spatial = shape
    coarse = [max(2, s // 4) for s in spatial]
    field = rng.standard_normal((n, c, *coarse)) * rng.uniform(0.5, 2.0, size=(n, 1) + (1,) * len(coarse))
    for axis, (small, big) in enumerate(zip(coarse, spatial, strict=True), start=2):
        pos = np.linspace(0, small - 1, big)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, small - 1)
        frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(field.ndim)])
        field = np.take(field, lo, axis=axis) * (1 - frac) + np.take(field, hi, axis=axis) * frac
    return 1.0 / (1.0 + np.exp(-field + rng.uniform(-1, 1, size=(n, 1) + (1,) * len(spatial))))


def _float_input(spec: InputSpec, rng: np.random.Generator, kind: str) -> NDArray[Any]:
    image_like = len(spec.shape) == 4 and spec.shape[1] <= 4 and min(spec.shape[2:]) >= 4
    if kind == "blobs" and image_like:
        return _smooth(rng, spec.shape).astype(spec.dtype)
    return rng.standard_normal(spec.shape).astype(spec.dtype)


def batches(specs: list[InputSpec], samples: int, batch: int | None, kind: str,
            seed: int) -> Iterator[dict[str, NDArray[Any]]]:
    """`samples` inputs in batches (of the model's fixed batch size when it has one)."""
    rng = np.random.default_rng(seed)
    size = batch or (specs[0].shape[0] if specs and specs[0].shape else 1)
    made = 0
    while made < samples:
        n = size if batch is None else min(size, samples - made)
        sized = [InputSpec(s.name, (n, *s.shape[1:]), s.dtype, s.high) if batch else s for s in specs]
        feeds = make_feeds(sized, seed=int(rng.integers(1 << 31)))
        for s in sized:
            if np.issubdtype(s.dtype, np.floating):
                feeds[s.name] = _float_input(s, rng, kind)
        yield feeds
        made += n
