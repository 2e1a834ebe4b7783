"""Where tensor data lives: large weights stay in files, memory-mapped on demand.

Loading leaves every large external tensor as a reference to its (checked) file, so a model in memory
is a protobuf skeleton plus read-only views that the kernel pages in and out: a 4 GB decoder loads in
megabytes, and onnxruntime maps the same files instead of copying them (`runtime.session`). Surgery
writes the weights of a pruned model to a scratch file (`Spill`) when its source was mapped, so it is
mapped too; saving copies file ranges in the kernel (`DataWriter`), never through Python memory.

A mapped tensor is an ordinary external-data TensorProto whose `location` is an absolute path, plus a
`graphprune` entry holding the file's identity (inode, size, mtime) when it was checked: files and
bytes from users can never carry absolute locations (loading refuses them), and a file that changed
since is refused instead of read.
"""

from __future__ import annotations

import atexit
import itertools
import mmap
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray
from onnx import TensorProto, helper

from graphprune.errors import InvalidModelError

__all__ = [
    "MAP_MIN_BYTES",
    "DataWriter",
    "Spill",
    "data_folder",
    "discard",
    "external_entries",
    "forget_mapping",
    "is_mapped",
    "map_array",
    "mappable",
    "mapped_nbytes",
    "mark_mapped",
    "sweep_scratch",
]

# Tensors from this size are mapped rather than read (and spilled rather than held) when a model keeps
# its weights in files; smaller ones (shapes, norms, biases) are read into the skeleton.
MAP_MIN_BYTES = 1024**2
ALIGNMENT = 64 * 1024  # data offsets in written files: onnxruntime maps tensors that start on a page
_KEY = "graphprune"
_SCRATCH = "scratch"  # the identity of this process's own scratch files, which grow while written
_SCRATCH_PREFIX = "graphprune-weights-"  # then the owning process's id and a random part
_COPY_CHUNK = 1 << 30
_maps: weakref.WeakValueDictionary[tuple[str, str], mmap.mmap] = weakref.WeakValueDictionary()


# --------------------------------------------------------------------------- mapped tensors


def mappable(tensor: TensorProto) -> bool:
    """Whether the tensor's type has a fixed-size numpy element (sub-byte and string types are read)."""
    return tensor.data_type != TensorProto.STRING and tensor.data_type in _NUMPY_TYPES


def is_mapped(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL and any(e.key == _KEY for e in tensor.external_data)


def mark_mapped(tensor: TensorProto, path: Path, offset: int, length: int, identity: str | None = None) -> None:
    """Make `tensor` (any data cleared) a mapped reference to `length` bytes of `path` at `offset`;
    `identity` defaults to the file's as it is now."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", str(path)), ("offset", str(offset)), ("length", str(length)),
                       (_KEY, identity or _identity(path.stat()))):
        tensor.external_data.add(key=key, value=value)


def forget_mapping(tensors: Iterable[TensorProto]) -> None:
    """Drop mapping entries from tensors of untrusted origin: only this process makes them."""
    for t in tensors:
        keep = [(e.key, e.value) for e in t.external_data if e.key != _KEY]
        if len(keep) != len(t.external_data):
            del t.external_data[:]
            for key, value in keep:
                t.external_data.add(key=key, value=value)


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _check_identity(name: str, path: Path, fd: int, identity: str) -> None:
    if identity != _SCRATCH and _identity(os.fstat(fd)) != identity:
        raise InvalidModelError(f"tensor {name!r}: its data file {str(path)!r} changed after the model was "
                                "loaded; load the model again")


def _info(tensor: TensorProto) -> tuple[Path, int, int, str]:
    entries = {e.key: e.value for e in tensor.external_data}
    return Path(entries["location"]), int(entries["offset"]), int(entries["length"]), entries[_KEY]


def mapped_nbytes(tensor: TensorProto) -> int:
    return _info(tensor)[2]


def map_array(tensor: TensorProto) -> NDArray[Any]:
    """A read-only view of a mapped tensor's data. Views of one file share one mapping, which closes
    with the last view, so memory follows what is in use, not what was ever read."""
    path, offset, length, identity = _info(tensor)
    dtype = np.dtype(_NUMPY_TYPES[tensor.data_type]).newbyteorder("<")
    key = (str(path), identity)
    mm = _maps.get(key)
    if mm is None or len(mm) < offset + length:  # a scratch file grows while surgery writes it
        try:
            with path.open("rb") as f:
                _check_identity(tensor.name, path, f.fileno(), identity)
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise InvalidModelError(f"tensor {tensor.name!r}: cannot read its data file {str(path)!r}: "
                                    f"{exc.strerror or exc}") from exc
        _maps[key] = mm
    count = length // dtype.itemsize
    return np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(tuple(tensor.dims))


def data_folder(tensors: list[TensorProto]) -> tuple[Path | None, dict[str, str]]:
    """The folder holding the most mapped bytes of `tensors`, and each mapped tensor's location relative
    to it (onnxruntime maps external data from one folder; tensors elsewhere are not in the dict)."""
    sizes: dict[Path, int] = {}
    for t in tensors:
        if is_mapped(t):
            path, _, length, _ = _info(t)
            sizes[path.parent] = sizes.get(path.parent, 0) + length
    if not sizes:
        return None, {}
    folder = max(sizes, key=lambda p: sizes[p])
    return folder, {t.name: _info(t)[0].name for t in tensors if is_mapped(t) and _info(t)[0].parent == folder}


def external_entries(tensor: TensorProto, location: str) -> list[tuple[str, str]]:
    """The external-data entries onnxruntime and onnx read, for a mapped tensor stored at `location`."""
    _, offset, length, _ = _info(tensor)
    return [("location", location), ("offset", str(offset)), ("length", str(length))]


# --------------------------------------------------------------------------- writing


class DataWriter:
    """Appends tensor data to an open binary file at aligned offsets: arrays from memory, mapped tensors
    as in-kernel copies of their file range (no page of them enters this process)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.offset = f.tell()

    def _align(self, length: int) -> None:
        pad = -self.offset % (ALIGNMENT if length >= 1024**2 else 16)
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad

    def array(self, value: NDArray[Any]) -> tuple[int, int]:
        """Write an array's little-endian bytes; (offset, length)."""
        data = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        return self.raw(data.reshape(-1).view(np.uint8).data)

    def raw(self, data: bytes | memoryview) -> tuple[int, int]:
        """Write bytes as they are; (offset, length)."""
        length = len(data)
        self._align(length)
        start = self.offset
        self.f.write(data)
        self.offset += length
        return start, length

    def copy(self, tensor: TensorProto) -> tuple[int, int]:
        """Copy a mapped tensor's bytes; (offset, length)."""
        path, offset, length, identity = _info(tensor)
        self._align(length)
        self.f.flush()
        start = self.offset
        with path.open("rb") as src:
            _check_identity(tensor.name, path, src.fileno(), identity)
            _copy_range(src.fileno(), self.f.fileno(), offset, start, length)
        self.offset += length
        self.f.seek(self.offset)
        return start, length


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
    done = 0
    while done < length:
        n = min(_COPY_CHUNK, length - done)
        try:
            copied = os.copy_file_range(src, dst, n, src_offset + done, dst_offset + done)
        except (AttributeError, OSError):  # other systems, or file systems that refuse it
            chunk = os.pread(src, min(n, 64 * 1024**2), src_offset + done)
            copied = os.pwrite(dst, chunk, dst_offset + done)
        if copied <= 0:
            raise OSError(f"short copy of tensor data at offset {src_offset + done}")
        done += copied


class Spill:
    """A scratch file that holds the large weights of a model built in this process (a pruned model
    whose source was mapped), so they are mapped like the source's instead of held in memory. Files
    live in one temporary folder per process (`$TMPDIR`), removed at exit; `discard` drops one early,
    `sweep_scratch` those of processes killed before their exit handlers ran."""

    _folder: Path | None = None
    _count = itertools.count()

    def __init__(self) -> None:
        self.path = self.folder() / f"weights-{next(self._count)}.data"
        self._file = self.path.open("wb")
        self._writer = DataWriter(self._file)

    @classmethod
    def folder(cls) -> Path:
        if cls._folder is None:
            cls._folder = Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-"))
            atexit.register(shutil.rmtree, cls._folder, True)
        return cls._folder

    def tensor(self, name: str, value: NDArray[Any]) -> TensorProto:
        """A mapped tensor named `name` holding `value`."""
        offset, length = self._writer.array(value)
        return self._ref(name, value.shape, helper.np_dtype_to_tensor_dtype(value.dtype), offset, length)

    def copied(self, tensor: TensorProto) -> TensorProto:
        """A mapped copy of another mapped tensor (a model's data then lives in one folder)."""
        offset, length = self._writer.copy(tensor)
        return self._ref(tensor.name, tuple(tensor.dims), tensor.data_type, offset, length)

    def _ref(self, name: str, dims: tuple[int, ...], data_type: int, offset: int, length: int) -> TensorProto:
        self._file.flush()  # readable (mapped) from here on
        ref = TensorProto(name=name, data_type=data_type, dims=dims)
        mark_mapped(ref, self.path, offset, length, _SCRATCH)
        return ref

    def close(self) -> None:
        self._file.close()


def sweep_scratch(root: str | None = None) -> list[Path]:
    """Remove the scratch folders (`Spill`) whose process is gone: a SIGKILLed worker leaves its pruned
    weights behind, up to the model's size each. Returns what was removed."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{_SCRATCH_PREFIX}*-*"):
        pid = folder.name.removeprefix(_SCRATCH_PREFIX).partition("-")[0]
        if not pid.isdigit() or not folder.is_dir() or _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def discard(tensors: Iterable[TensorProto]) -> None:
    """Delete the scratch files `tensors` are mapped from (views still open keep their data)."""
    folder = Spill._folder
    for path in {_info(t)[0] for t in tensors if is_mapped(t)}:
        if folder is not None and path.parent == folder:
            path.unlink(missing_ok=True)


_NUMPY_TYPES: dict[int, Any] = {
    t: helper.tensor_dtype_to_np_dtype(t)
    for t in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.UINT8,
              TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.UINT32, TensorProto.INT64,
              TensorProto.UINT64, TensorProto.BOOL, TensorProto.COMPLEX64, TensorProto.COMPLEX128)
}
