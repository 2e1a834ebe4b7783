"""Request bodies to disk: streamed in chunks under a byte cap, hashed on the way, never held whole.

A raw `application/octet-stream` body is the model; a `multipart/form-data` body (browsers) holds
it in a `model` file part and may carry options as text fields. Before a job is accepted the file
is checked to be a protobuf message with a graph in it, so empty, garbage and truncated bodies
get a 400 at once instead of a job that fails later. The real parse happens in the worker.

An `application/json` body names an MLflow model instead (`fetch`): it is downloaded under the
same byte cap and, unlike an upload, parsed here with the library's safe loader, because its
external-data files must be folded into the one self-contained input file a job has.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from graphprune import mlflow_io
from graphprune.errors import InvalidModelError, ModelTooLargeError, UsageError
from graphprune.loading import load_model
from graphprune.model import model_bytes
from service.artifacts import CHUNK
from service.problems import Problem

MODEL_PART = "model"
MULTIPART_OVERHEAD = 1 << 20  # boundaries, part headers and option fields on top of the model
JSON_MEDIA = "application/json"
MAX_JSON_BYTES = 1 << 16  # a JSON body only names a model and options
# MLflow retries an unreachable server with backoff for minutes by default; a submit request fails fast
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@dataclass
class Upload:
    path: Path
    size: int
    sha256: str
    fields: list[tuple[str, str]] = field(default_factory=list)  # multipart text fields


async def receive(request: Request, directory: Path, max_bytes: int) -> Upload:
    """Store the request's model under `directory` (raises 400/413/415/422 as Problems)."""
    media = media_type(request)
    if media not in ("application/octet-stream", "multipart/form-data"):
        raise Problem(415, f"unsupported media type {media or '(none)'!r}: send the .onnx bytes as "
                           "application/octet-stream (curl --data-binary @model.onnx -H 'Content-Type: "
                           "application/octet-stream'), a multipart/form-data form with a 'model' file, or "
                           'application/json naming an MLflow model ({"source": "models:/NAME/VERSION"})')
    declared = request.headers.get("content-length")
    overhead = MULTIPART_OVERHEAD if media == "multipart/form-data" else 0
    if declared and declared.isdigit() and int(declared) > max_bytes + overhead:
        raise _too_large(max_bytes)
    path = directory / f"{uuid.uuid4().hex}.part"
    try:
        upload = await (_raw if media == "application/octet-stream" else _multipart)(request, path, max_bytes)
        if upload.size > max_bytes:
            raise _too_large(max_bytes)
        problem = await run_in_threadpool(_check_model_file, path, upload.size)
        if problem:
            raise Problem(400, problem)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return upload


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def receive_json(request: Request) -> bytes:
    """A small JSON body, whole (413 past MAX_JSON_BYTES)."""
    data = bytearray()
    try:
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_JSON_BYTES:
                raise Problem(413, f"a JSON body is limited to {MAX_JSON_BYTES:,} bytes; it only names a model")
    except ClientDisconnect:
        raise Problem(400, "the client went away before the end of the body") from None
    return bytes(data)


async def fetch(uri: str, scratch: Path, directory: Path, max_bytes: int) -> Upload:
    """Download an MLflow model into `directory` as one self-contained file, as if it had been uploaded.

    422: the URI names nothing usable · 424: the MLflow store failed · 413: over `max_bytes` ·
    400: not a loadable model. `scratch` holds the download (a folder the startup sweep removes).
    """
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return await run_in_threadpool(_fetch, uri, scratch, directory / f"{uuid.uuid4().hex}.part", max_bytes)


def _fetch(uri: str, scratch: Path, path: Path, max_bytes: int) -> Upload:
    try:
        with tempfile.TemporaryDirectory(dir=scratch, prefix="mlflow-") as tmp:
            local = mlflow_io.download(uri, Path(tmp), max_bytes=max_bytes)
            data = model_bytes(load_model(local, max_bytes=max_bytes))
    except mlflow_io.MlflowUnavailableError as exc:
        raise Problem(424, str(exc)) from None
    except ModelTooLargeError as exc:
        raise Problem(413, f"{exc} (GRAPHPRUNE_MAX_UPLOAD_BYTES)") from None
    except InvalidModelError as exc:
        raise Problem(400, f"{uri}: {exc}") from None
    except (UsageError, ValueError) as exc:  # MlflowError; ValueError: protobuf's 2 GiB limit on serializing
        raise Problem(422, str(exc)) from None
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    try:
        with path.open("wb") as out:
            out.write(data)
            _sync(out)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Upload(path, len(data), hashlib.sha256(data).hexdigest())


def _too_large(max_bytes: int) -> Problem:
    return Problem(413, f"the model is larger than this server accepts ({max_bytes:,} bytes, "
                        "GRAPHPRUNE_MAX_UPLOAD_BYTES)")


async def _limited(request: Request, max_bytes: int, allowance: int = 0) -> AsyncGenerator[bytes, None]:
    """The body in chunks, cut at `max_bytes` + `allowance` (a form's framing); the 413 names the cap."""
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes + allowance:
                raise _too_large(max_bytes)
            yield chunk
    except ClientDisconnect:
        raise Problem(400, f"the client went away after {total:,} bytes of the body") from None


async def _raw(request: Request, path: Path, max_bytes: int) -> Upload:
    digest = hashlib.sha256()
    size = 0
    with path.open("wb") as out:
        async for chunk in _limited(request, max_bytes):
            await run_in_threadpool(_write, out, digest, chunk)
            size += len(chunk)
        await run_in_threadpool(_sync, out)
    return Upload(path, size, digest.hexdigest())


async def _multipart(request: Request, path: Path, max_bytes: int) -> Upload:
    parser = MultiPartParser(request.headers, _limited(request, max_bytes, MULTIPART_OVERHEAD), max_files=1,
                             max_fields=100)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise Problem(400, f"malformed multipart body: {exc.message}") from None
    try:
        model = form.get(MODEL_PART)
        if not isinstance(model, UploadFile):
            raise Problem(422, f"the multipart form needs a file part named {MODEL_PART!r} with the .onnx model")
        fields = [(k, v) for k, v in form.multi_items() if isinstance(v, str)]
        size, digest = await run_in_threadpool(_copy, model.file, path)
    finally:
        await form.close()
    return Upload(path, size, digest, fields)


def _write(out: BinaryIO, digest: hashlib._Hash, chunk: bytes) -> None:
    out.write(chunk)
    digest.update(chunk)


def _sync(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())


def _copy(src: BinaryIO, path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    src.seek(0)
    with path.open("wb") as out:
        while chunk := src.read(CHUNK):
            _write(out, digest, chunk)
            size += len(chunk)
        _sync(out)
    return size, digest.hexdigest()


# ---------------------------------------------------------------- a protobuf walk of ModelProto's top level

_GRAPH_FIELD = 7  # onnx.proto: ModelProto.graph
_WIRE_SIZES = {1: 8, 5: 4}  # fixed64, fixed32; 0 is a varint, 2 is length-delimited
# An .onnx file has a few dozen top-level fields (versions, opsets, metadata, functions, the graph);
# the walk is Python, holding the GIL a few microseconds per field, so it stops here: a body of
# millions of tiny fields would otherwise stall the event loop for seconds.
MAX_TOP_LEVEL_FIELDS = 100_000


def _check_model_file(path: Path, size: int) -> str | None:
    """None if the file parses as protobuf fields up to its last byte and holds a graph; else why not."""
    if size == 0:
        return "the body is empty: send the bytes of an .onnx model"
    with path.open("rb") as f:
        pos, has_graph, fields = 0, False, 0
        while pos < size:
            fields += 1
            if fields > MAX_TOP_LEVEL_FIELDS:
                return (f"not an ONNX model: over {MAX_TOP_LEVEL_FIELDS:,} top-level protobuf fields "
                        "(an .onnx file has a few dozen)")
            start = pos
            key, pos = _varint(f, pos)
            number, wire = (key >> 3, key & 7) if key is not None else (0, -1)
            if number == 0 or wire not in (0, 1, 2, 5):
                return f"not an ONNX model: no protobuf field at byte {start} (is this an .onnx file?)"
            if wire == 0:
                value, pos = _varint(f, pos)
                if value is None:
                    return _truncated(start, size)
            elif wire == 2:
                length, pos = _varint(f, pos)
                if length is None:
                    return _truncated(start, size)
                pos += length
                has_graph = has_graph or number == _GRAPH_FIELD
            else:
                pos += _WIRE_SIZES[wire]
            if pos > size:
                return _truncated(start, size)
            f.seek(pos)
    return None if has_graph else "not an ONNX model: it has no graph"


def _truncated(start: int, size: int) -> str:
    return f"the model is truncated: the field at byte {start} runs past the end of the {size}-byte body"


def _varint(f: BinaryIO, pos: int) -> tuple[int | None, int]:
    value = 0
    for shift in range(0, 70, 7):
        byte = f.read(1)
        if not byte:
            return None, pos
        pos += 1
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value, pos
    return None, pos
