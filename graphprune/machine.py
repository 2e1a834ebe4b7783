"""What this machine measures: a key for it, a JSON cache of measurements under it, and one-thread
onnxruntime sessions to time with.

Timings are only valid for the CPU and onnxruntime version that produced them, so every cached table
(`widths.json`, `latency.json`) is keyed by both. The cache lives in `GRAPHPRUNE_CACHE_DIR`, else
~/.cache/graphprune; a read-only home only means measuring again next time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnxruntime as ort
    from onnx import ModelProto


def cache_dir() -> Path:
    return Path(os.environ.get("GRAPHPRUNE_CACHE_DIR") or Path.home() / ".cache" / "graphprune")


@functools.cache
def machine_key() -> str:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
        flags = next((ln.split(":", 1)[1] for ln in lines if ln.startswith("flags")), "")
        cpu += " " + hashlib.sha256(flags.encode()).hexdigest()[:8]
    except OSError:
        pass
    return f"onnxruntime {ort.__version__} | {cpu}"


def read_cache(name: str) -> dict[str, Any]:
    """This machine's entries of the cache file `name` (empty when there is none or it is unreadable)."""
    try:
        entry = json.loads((cache_dir() / name).read_text()).get(machine_key(), {})
    except (OSError, ValueError, AttributeError):
        return {}
    return entry if isinstance(entry, dict) else {}


def write_cache(name: str, entries: dict[str, Any]) -> None:
    """Replace this machine's entries of `name`, atomically (concurrent writers lose only entries)."""
    path = cache_dir() / name
    try:
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict):
            stored = {}
    except (OSError, ValueError):
        stored = {}
    stored[machine_key()] = entries
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=1))
        tmp.replace(path)
    except OSError:
        pass


def one_thread_session(model: ModelProto | Path, profile_dir: str | None = None) -> ort.InferenceSession:
    """A session as the latency tables are measured: one intra-op thread, all graph optimizations
    (the NCHWc layout and fusions the deployed model gets), profiling into `profile_dir` if given;
    `model` in memory or a file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / "op")
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
