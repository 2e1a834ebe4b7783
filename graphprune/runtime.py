"""onnxruntime sessions for analysis and validation (CPU, no custom-op libraries ever)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import ModelProto, TensorProto

from graphprune.errors import InvalidModelError
from graphprune.model import without_initializers
from graphprune.tensors import tensor_nbytes
from graphprune.weights import data_folder, external_entries, is_mapped, map_array

# onnx 1.23 writes IR 14 by default and onnxruntime 1.31 reads less; graphprune keeps the user's IR
# version in what it writes and only lowers it in the private copy it runs.
RUNTIME_IR_VERSION = 10
_IN_MEMORY_BYTES = 4096  # smaller initializers stay in the serialized skeleton
Arrays = Callable[[str], NDArray[Any] | None]  # an initializer's value already in memory, or None
_RAW_DTYPES = {t: np.dtype(d) for t, d in (
    (TensorProto.FLOAT, "<f4"), (TensorProto.DOUBLE, "<f8"), (TensorProto.FLOAT16, "<f2"),
    (TensorProto.INT8, "i1"), (TensorProto.UINT8, "u1"), (TensorProto.INT16, "<i2"), (TensorProto.UINT16, "<u2"),
    (TensorProto.INT32, "<i4"), (TensorProto.UINT32, "<u4"), (TensorProto.INT64, "<i8"),
    (TensorProto.UINT64, "<u8"), (TensorProto.BOOL, "?"))}


def cpus() -> int:
    """The cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_memory() -> int:
    """Bytes this process could still allocate: the kernel's MemAvailable, or less where a cgroup
    (a container's memory limit) leaves less; without /proc, the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def idle_cpus(window_s: float = 0.1) -> int:
    """Of those cores, how many other processes leave free now, for BLAS threads: OpenBLAS workers
    busy-wait, and against a busy core they lose more than they add. ResNet-50 with default OBS on 2
    cores: idle, 28 s with 2 threads vs 32 s with 1; one core busy, 57 s vs 36 s. Measured over
    `window_s` from /proc/stat less this process's own CPU time (the load average counts this process
    too, and lags a minute); without /proc, from the load average."""
    try:
        busy0, self0 = _busy_seconds(), _own_seconds()
        time.sleep(window_s)
        others = (_busy_seconds() - busy0 - (_own_seconds() - self0)) / window_s
    except OSError:
        others = os.getloadavg()[0] if hasattr(os, "getloadavg") else float(cpus())
    return max(1, min(cpus(), round(cpus() - others)))


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent on anything but idling, from /proc/stat's first line."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def session(model: ModelProto, threads: int | None = None, extra_outputs: Sequence[str] = (),
            spinning: bool = True, timed: bool = True, weights: ModelProto | None = None,
            arrays: Arrays | None = None) -> ort.InferenceSession:
    """A session over `model`, optionally returning the intermediate tensors `extra_outputs` too.
    `spinning=False` where numpy works between runs: idle onnxruntime workers would busy-wait on the
    cores it needs. `timed=False` for a session run a few times only: without weight pre-packing
    onnxruntime reads the weights in place instead of keeping a packed copy of each (a model's size
    less in memory, and faster to open). `weights`: a model whose initializers `model` also reads
    (the masked reference runs on the original's weights without a copy of them). `arrays`: initializer
    values already in memory (`DependencyGraph.known_const`), used instead of a fresh copy.

    Only a weightless skeleton is serialized: serializing a ResNet-50 and parsing it back cost ~0.35 s
    per session (measured), and validation and compensation open several. Mapped weights are mapped by
    onnxruntime from their files (no copy: a 4 GB model's session holds what it touches, file-backed);
    weights in memory reach it as external initializers, which it copies.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or min(4, cpus())
    opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not timed:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    skeleton, folder, names, values = _skeleton(model, weights, arrays)
    if folder is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    skeleton.ir_version = min(model.ir_version, RUNTIME_IR_VERSION)
    known = {o.name for o in skeleton.graph.output}
    for name in dict.fromkeys(extra_outputs):
        if name not in known:
            skeleton.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    if names:
        opts.add_external_initializers(names, values)
    try:
        sess = ort.InferenceSession(skeleton.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise InvalidModelError(f"onnxruntime cannot load the model: {exc}".strip()) from exc
    sess._graphprune_weights = values  # onnxruntime reads the numpy buffers in place: keep them alive
    return sess


def probe_session(model: ModelProto, names: list[str], arrays: Arrays | None = None) -> ort.InferenceSession:
    """A session that also returns the intermediate tensors `names` (the model is untouched), for
    statistics: numpy consumes them between runs, so the workers do not spin."""
    return session(model, extra_outputs=names, spinning=False, arrays=arrays)


def _skeleton(model: ModelProto, weights: ModelProto | None = None, arrays: Arrays | None = None
              ) -> tuple[ModelProto, str | None, list[str], list[ort.OrtValue]]:
    """`model` (plus the initializers of `weights`) with the large top-level initializers replaced by
    external-data stubs; the folder onnxruntime maps the mapped ones from (`weights.data_folder`), and
    the values of the others: from `arrays` where it has them (values already in memory, shared), else
    read from the proto (every read of `raw_data` is a copy, so it is read once). onnxruntime copies
    values given this way, but maps files in place."""
    skeleton = without_initializers(model)
    names: list[str] = []
    values: list[ort.OrtValue] = []
    inits = [*model.graph.initializer, *(weights.graph.initializer if weights is not None else [])]
    folder, located = data_folder(inits)
    for init in inits:
        dtype = _RAW_DTYPES.get(init.data_type)
        if init.name in located:
            stub = _stub(skeleton, init)
            stub.external_data.extend(_entries(init, located[init.name]))
            continue
        if not is_mapped(init) and (dtype is None or not init.HasField("raw_data")
                                    or init.data_location == TensorProto.EXTERNAL
                                    or tensor_nbytes(init) < _IN_MEMORY_BYTES):
            skeleton.graph.initializer.append(init)
            continue
        _stub(skeleton, init).external_data.add(key="location", value="graphprune-in-memory")
        shared = arrays(init.name) if arrays is not None else None
        array = (map_array(init) if is_mapped(init) else np.ascontiguousarray(shared, dtype=dtype)
                 if shared is not None else np.frombuffer(init.raw_data, dtype=dtype).reshape(tuple(init.dims)))
        names.append(init.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    return skeleton, None if folder is None else str(folder), names, values


def _stub(skeleton: ModelProto, init: TensorProto) -> TensorProto:
    stub = skeleton.graph.initializer.add()
    stub.name, stub.data_type, stub.data_location = init.name, init.data_type, TensorProto.EXTERNAL
    stub.dims.extend(init.dims)
    return stub


def _entries(init: TensorProto, location: str) -> list[onnx.StringStringEntryProto]:
    return [onnx.StringStringEntryProto(key=k, value=v) for k, v in external_entries(init, location)]


def run(sess: ort.InferenceSession, feeds: dict[str, NDArray[Any]],
        outputs: list[str] | None = None) -> dict[str, NDArray[Any]]:
    names = outputs or [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, feeds)
    except Exception as exc:
        shapes = ", ".join(f"{k}={list(v.shape)}" for k, v in feeds.items())
        raise InvalidModelError(
            f"onnxruntime failed to run the model on inputs {shapes}: {exc}; if an input has dynamic "
            "dimensions, give a shape the model accepts with --input-shape NAME=D1,D2,...".strip()) from exc
    return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}
