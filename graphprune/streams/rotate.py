"""Slicing a residual stream exactly up to the directions it drops (computational invariance).

For an orthogonal Q, RMSNorm(x Q) = RMSNorm(x) Q once the norm's scale g is folded into its readers,
so writing every writer as W Q, the embedding as E Q and every reader as Qᵀ diag(g) W leaves the model's
function unchanged. With Q the principal directions of the normalized stream (from the same inputs OBS
uses), keeping its first k columns drops the directions that carry the least energy. The norm then
averages k squares instead of d: its epsilon becomes eps·d/k and the readers gain sqrt(d/k), so
the only error left is the dropped energy (none at k = d).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto, numpy_helper

from graphprune import runtime
from graphprune.streams.find import Stream
from graphprune.tensors import to_array

Feeds = dict[str, NDArray[Any]]


@dataclass
class Basis:
    """The stream's principal directions, strongest first, and the energy along each."""

    q: NDArray[np.float64]  # [d, d], orthogonal
    energy: NDArray[np.float64]  # [d], descending

    def kept_energy(self, k: int) -> float:
        total = float(self.energy.sum())
        return float(self.energy[:k].sum()) / total if total > 0 else 1.0


def principal_basis(gram: NDArray[np.float64]) -> Basis:
    """Eigenvectors of the stream's second-moment matrix, by decreasing eigenvalue."""
    values, vectors = np.linalg.eigh((gram + gram.T) / 2)
    order = np.argsort(values)[::-1]
    return Basis(vectors[:, order], np.clip(values[order], 0.0, None))


def stream_grams(model: ModelProto, streams: list[Stream], feeds: Iterable[Feeds],
                 arrays: runtime.Arrays | None = None) -> list[NDArray[np.float64]]:
    """Σ xᵀx of the normalized stream over every norm, token and input, one [d, d] per stream."""
    names = [n.normalized for s in streams for n in s.norms]
    grams = [np.zeros((s.width, s.width)) for s in streams]
    sess = runtime.probe_session(model, names, arrays)
    for feed in feeds:
        acts = runtime.run(sess, feed, names)
        for gram, s in zip(grams, streams, strict=True):
            for n in s.norms:
                x = acts[n.normalized].reshape(-1, s.width).astype(np.float64)
                gram += x.T @ x
    return grams


def slice_stream(model: ModelProto, stream: Stream, basis: Basis, keep: int) -> None:
    """Rewrite `model`'s initializers (in place) so the stream is `keep` wide in the rotated basis."""
    d = stream.width
    q = basis.q[:, :keep]
    gain = np.sqrt(d / keep)
    inits = {t.name: t for t in model.graph.initializer}

    def put(name: str, value: NDArray[Any]) -> None:
        old = inits[name]
        new = numpy_helper.from_array(value.astype(to_array(old).dtype), name)
        old.CopyFrom(new)

    def get(name: str) -> NDArray[np.float64]:
        return to_array(inits[name]).astype(np.float64)

    put(stream.embedding, get(stream.embedding) @ q)
    for shape, index in stream.widths:  # Reshapes of the leading axes that spell the width out
        value = to_array(inits[shape]).copy()
        value.reshape(-1)[index] = keep
        inits[shape].CopyFrom(numpy_helper.from_array(value, shape))
    for table in stream.tables:
        put(table, get(table) @ q)
    for weight, bias in stream.writers:
        put(weight, get(weight) @ q)
        if bias is not None:
            put(bias, get(bias) @ q)
    for norm in stream.norms:
        scale = get(norm.scale)
        for reader in norm.readers:
            put(reader, gain * (q.T @ (scale[:, None] * get(reader))))
        put(norm.scale, np.ones(keep))
        eps = get(norm.eps)
        put(norm.eps, eps * (d / keep))
    del model.graph.value_info[:]  # it still says d wide; shapes are inferred again from the weights
