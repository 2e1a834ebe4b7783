"""What every accuracy task shares: the cache folder, ONNX export and running a model in onnxruntime.

Scoring always goes through ONNX (the dense model, graphprune's output and Torch-Pruning's re-exported
net alike), so every method is measured by the same runtime on the same inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import ModelProto

if TYPE_CHECKING:
    import onnxruntime as ort
    import torch
    from torch import nn

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "accuracy"
OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime 1.31 refuses the IR 11+ that onnx 1.23 writes by default
ORT_THREADS = 2

Scores = dict[str, float]  # metric name -> value; the first entry is the headline metric
UNLABELLED_INPUTS = 256  # the recovery row's unlabelled inputs (issue: "256 unlabelled inputs")


@dataclass
class TorchNet:
    """A torch net plus what Torch-Pruning needs to prune it the way graphprune prunes its export."""

    model: nn.Module
    example: dict[str, torch.Tensor]  # ONNX input name -> example tensor (batch 1)
    ignored: list[nn.Module]  # layers whose outputs are the model's interface (the classifier)
    num_heads: dict[nn.Module, int] = field(default_factory=dict)  # qkv projections, for head-aware pruning


@dataclass
class Task:
    """One model with its real-data scorer.

    `torch_net` is None where Torch-Pruning has no torch net to prune (an ONNX-only model) or cannot
    keep the model's interface (an output whose width it would prune).
    """

    name: str
    onnx_path: Path
    score: Callable[[ModelProto | Path], Scores]
    calibration: Path | None = None  # .npz of real inputs named like the ONNX inputs
    prune_options: dict[str, Any] = field(default_factory=dict)  # e.g. input_shapes for dynamic inputs
    torch_net: Callable[[], TorchNet] | None = None
    note: str = ""
    unlabelled: Path | None = None  # .npz of UNLABELLED_INPUTS real inputs for the recovery-with-data row
    recover_options: dict[str, Any] = field(default_factory=dict)  # e.g. a time budget for the large models


def fingerprint(*parts: Any) -> str:
    """Cache key: the given parts plus the versions that change what training/export produce."""
    versions = [f"{d}=={metadata.version(d)}" for d in ("torch", "onnx", "numpy")]
    return hashlib.sha256(json.dumps([parts, versions], sort_keys=True, default=str).encode()).hexdigest()[:10]


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Write through a temp file and rename, so an interrupted run never leaves a half-written cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def export_onnx(model: nn.Module, example: dict[str, torch.Tensor], output: str = "logits") -> ModelProto:
    """TorchScript export (opset 17, dynamic batch, IR <= 10); eval mode, so BatchNorm is folded."""
    import torch

    buf = io.BytesIO()
    model.eval()
    axes = {name: {0: "batch"} for name in [*example, output]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is deprecated
        torch.onnx.export(model, tuple(example.values()), buf,  # type: ignore[arg-type]  # the stub lacks IO
                          dynamo=False, opset_version=OPSET, input_names=list(example), output_names=[output],
                          dynamic_axes=axes)
    proto = onnx.load_from_string(buf.getvalue())
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return proto


def english_sentences(count: int, min_words: int = 6, max_words: int = 25) -> tuple[str, ...]:
    """Real English sentences that ship with Python (the pydoc topic texts), for unlabelled text
    inputs: never the scored ones, reproducible, no download."""
    import re
    from pydoc_data import topics

    text = re.sub(r"\s+", " ", " ".join(topics.topics[k] for k in sorted(topics.topics)))
    found = [t.strip() for t in re.split(r"(?<=[.!?])\s+", text)]
    plain = [t for t in found if min_words <= len(t.split()) <= max_words and re.fullmatch(r"[A-Za-z0-9 ,.;:'()-]+", t)]
    unique = list(dict.fromkeys(plain))
    if len(unique) < count:
        raise ValueError(f"only {len(unique)} sentences of {min_words}-{max_words} words, {count} asked")
    pick = np.random.default_rng(0).permutation(len(unique))[:count]
    return tuple(unique[i] for i in sorted(pick))


def cached_onnx(path: Path, build: Callable[[], ModelProto]) -> Path:
    if not path.exists():
        proto = build()
        atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))
    return path


def cached_npz(path: Path, build: Callable[[], dict[str, np.ndarray]]) -> Path:
    """Calibration data: arrays named like the model's inputs, as graphprune's `calibration=` expects."""
    if not path.exists():
        arrays = build()
        atomic_write(path, lambda tmp: np.savez(tmp, **arrays))  # type: ignore[arg-type]  # numpy stub
    return path


def session(model: ModelProto | Path) -> ort.InferenceSession:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ORT_THREADS
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # spinning threads starve a shared CPU
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def run_batches(model: ModelProto | Path, batches: Iterable[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The first output of each batch, from one session (batches may differ in shape)."""
    sess = session(model)
    return [sess.run(None, feeds)[0] for feeds in batches]


def run_onnx(model: ModelProto | Path, feeds: dict[str, np.ndarray], batch: int = 256) -> np.ndarray:
    """The first output over all rows of `feeds`, run `batch` rows at a time to bound memory."""
    rows = len(next(iter(feeds.values())))
    return np.concatenate(run_batches(model, ({k: v[i:i + batch] for k, v in feeds.items()}
                                              for i in range(0, rows, batch))))
