"""The stream stage of `prune` (`streams="rotate"`): find the streams, measure their principal
directions on the inputs OBS uses, slice every stream, and say per stream what it cost."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

from onnx import ModelProto

from graphprune import runtime
from graphprune.compensate import input_batches
from graphprune.config import PruneConfig
from graphprune.inputs import InputSpec
from graphprune.streams.centre import layernorm_as_rms
from graphprune.streams.find import find_streams
from graphprune.streams.rotate import principal_basis, slice_stream, stream_grams
from graphprune.validate import relative_error
from graphprune.widths import measured_multiples

HELD_OUT_BATCHES = 2


def kept_width(width: int, cfg: PruneConfig) -> int:
    """The stream width left by `cfg`: the sparsity's share removed under the per-group cap, the rest
    rounded up to a multiple of round_to (with "auto", of what MatMuls prefer: the stream's writers and
    readers are all MatMuls), never more removed than asked, at least min_channels."""
    removed = min(math.floor(cfg.sparsity * width), math.floor(cfg.max_group_sparsity * width))
    multiple = measured_multiples()["matmul"]["multiple"] if cfg.multiple == "auto" else cfg.multiple
    keep = min(width, math.ceil((width - removed) / multiple) * multiple)
    return max(keep, min(cfg.min_channels, width))


def slice_streams(model: ModelProto, specs: list[InputSpec], cfg: PruneConfig,
                  arrays: runtime.Arrays | None = None) -> tuple[ModelProto | None, dict[str, Any]]:
    """(the model with every rotatable stream sliced, or None when there is none; the report entry).

    LayerNorm streams are first made RMSNorm streams (centre.py), exactly; the rest is the same."""
    centred, via_layernorm, ln_refused = layernorm_as_rms(model)
    base = centred if centred is not None else model
    streams, refused = find_streams(base)
    found = {s.embedding for s in streams}
    # a stream refused as an RMSNorm stream because LayerNorm reads it is explained by the LayerNorm pass
    left_alone = [r for r in refused if "LayerNormalization" not in r] + [
        r for r in ln_refused if not any(r.startswith(f"stream from embedding '{e}'") for e in found)]
    entry: dict[str, Any] = {"mode": "rotate", "streams": [], "left_alone": left_alone}
    if not streams:
        return None, entry
    base_arrays = arrays if centred is None else None  # centring rewrote weights the original's arrays hold
    source, feeds = input_batches(base, specs, cfg, "blobs", cfg.seed)
    grams = stream_grams(base, streams, feeds, base_arrays)
    sliced = copy.deepcopy(base)
    for stream, gram in zip(streams, grams, strict=True):
        basis = principal_basis(gram)
        keep = kept_width(stream.width, cfg)
        slice_stream(sliced, stream, basis, keep)
        entry["streams"].append({
            "stream": stream.name, "embedding": stream.embedding, "width": stream.width, "kept": keep,
            "norm": "LayerNorm (centred to RMSNorm)" if stream.embedding in via_layernorm else "RMSNorm",
            "writers": len(stream.writers), "norms": len(stream.norms),
            "readers": sum(len(n.readers) for n in stream.norms),
            "energy_kept": round(basis.kept_energy(keep), 6),
        })
    entry["statistics"] = source
    entry["output_rel_error"] = _held_out_error(model, sliced, specs, cfg, arrays)
    return sliced, entry


def _held_out_error(model: ModelProto, sliced: ModelProto, specs: list[InputSpec], cfg: PruneConfig,
                    arrays: runtime.Arrays | None) -> float:
    """The sliced model's output error on inputs the directions were not measured on."""
    _, feeds = input_batches(model, specs, cfg, "blobs", cfg.seed + 7919)
    batches = list(itertools.islice(feeds, HELD_OUT_BATCHES))
    dense = runtime.session(model, timed=False, arrays=arrays)
    refs = [runtime.run(dense, b) for b in batches]
    del dense
    small = runtime.session(sliced, timed=False)
    errors = [relative_error(r, runtime.run(small, b)) for r, b in zip(refs, batches, strict=True)]
    return round(max(errors), 6)
