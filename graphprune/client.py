"""Python client for a graphprune server (`graphprune serve`): submit, wait, download, cancel.

    from graphprune.client import Client

    with Client("http://127.0.0.1:8000") as client:
        job = client.submit("model.onnx", sparsity=0.3)
        job = client.wait(job["id"])
        client.download(job["id"], "model.pruned.onnx")

Errors are GraphpruneErrors, so callers (and `graphprune submit`) treat a remote prune like a local
one: a failed job raises JobFailedError with the exit code `graphprune prune` would have used, and a
server that cannot be reached raises ServerUnreachableError (exit code 6).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from graphprune.errors import GraphpruneError, ServerUnreachableError, UsageError, WaitTimeoutError
from graphprune.mlflow_io import is_model_uri

DEFAULT_URL = "http://127.0.0.1:8000"
Job = dict[str, Any]
_CHUNK = 1 << 20


class ServiceError(GraphpruneError):
    """The server refused a request or answered wrongly; `problem` is its problem+json body."""

    def __init__(self, message: str, status: int | None = None, problem: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem or {}
        # the CLI's codes: the body is not a usable model → 3, other refusals → 2, the server's fault → 1
        self.exit_code = 3 if status in (400, 413) else 2 if status and 400 <= status < 500 else 1


class JobFailedError(GraphpruneError):
    """The job ended without a result; `job["error"]` says why."""

    def __init__(self, job: Job) -> None:
        error = job.get("error") or {"kind": job["status"].capitalize(), "message": f"the job was {job['status']}"}
        super().__init__(f"job {job['id']} {job['status']}: {error['kind']}: {error['message']}")
        self.job = job
        self.kind: str = error["kind"]
        self.exit_code = int(error.get("exit_code", 1))


class Client:
    def __init__(self, url: str | None = None, *, token: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        """`url` defaults to $GRAPHPRUNE_URL or 127.0.0.1:8000, `token` to $GRAPHPRUNE_API_TOKEN."""
        token = token if token is not None else os.environ.get("GRAPHPRUNE_API_TOKEN")
        self.url = (url or os.environ.get("GRAPHPRUNE_URL") or DEFAULT_URL).rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {token}"} if token else {})

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def submit(self, model: str | os.PathLike[str] | bytes, config: dict[str, Any] | None = None, *,
               idempotency_key: str | None = None, **options: Any) -> Job:
        """Upload a model (path or bytes, streamed from disk) with pruning options; → the queued job.
        A `models:/` or `runs:/` string is an MLflow model URI: the server downloads it instead."""
        params = {"config": json.dumps({**(config or {}), **options})}
        headers = {"Content-Type": "application/octet-stream"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        if isinstance(model, str) and is_model_uri(model):
            headers["Content-Type"] = "application/json"
            return self._json("POST", "/v1/jobs", params=params, headers=headers, content=json.dumps({"source": model}))
        if isinstance(model, bytes):
            return self._json("POST", "/v1/jobs", params=params, headers=headers, content=model)
        path = Path(model)
        if not path.is_file():
            raise ServiceError(f"input model not found: {path}", 404)
        headers["Content-Length"] = str(path.stat().st_size)
        with path.open("rb") as f:
            return self._json("POST", "/v1/jobs", params=params, headers=headers, content=_chunks(f))

    def get(self, job_id: str) -> Job:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def jobs(self, *, limit: int = 50, cursor: str | None = None, status: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"limit": limit, "cursor": cursor, "status": status}.items() if v is not None}
        return self._json("GET", "/v1/jobs", params=params)

    def wait(self, job_id: str, *, timeout: float | None = None,
             progress: Callable[[str, float], None] | None = None) -> Job:
        """Poll until the job ends; → the succeeded job, else JobFailedError (WaitTimeoutError, a
        TimeoutError, after `timeout`: the job itself goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval, seen = 0.05, None
        while True:
            job = self.get(job_id)
            if progress is not None and (job["stage"], job["progress"]) != seen:
                seen = (job["stage"], job["progress"])
                progress(job["stage"] or job["status"], job["progress"])
            if job["status"] == "succeeded":
                return job
            if job["status"] in ("failed", "cancelled"):
                raise JobFailedError(job)
            if deadline is not None and time.monotonic() + interval > deadline:
                raise WaitTimeoutError(f"job {job_id} is still {job['status']} ({job['stage']}) after {timeout:g} s; "
                                       f"it goes on on the server: follow /v1/jobs/{job_id}, or cancel it with "
                                       "DELETE")
            time.sleep(interval)
            interval = min(interval * 1.5, 1.0)

    def download(self, job_id: str, path: str | os.PathLike[str]) -> Path:
        """Stream the pruned model to `path` (atomically), checking its sha256 against the ETag."""
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
        try:
            with (os.fdopen(fd, "wb") as out, self._reachable(),
                  self._http.stream("GET", f"/v1/jobs/{job_id}/result") as response):
                self._check(response)
                digest = hashlib.sha256()
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
            etag = response.headers.get("ETag", "").strip('"')
            if etag and etag != digest.hexdigest():
                raise ServiceError(f"download of job {job_id} is corrupt: sha256 {digest.hexdigest()} != ETag {etag}")
            os.replace(tmp_name, dest)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
        return dest

    def report(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}/report")

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job (→ the cancelled job) or delete a finished one (→ None)."""
        response = self._send("DELETE", f"/v1/jobs/{job_id}")
        return None if response.status_code == 204 else response.json()

    def prune(self, model: str | os.PathLike[str] | bytes, output: str | os.PathLike[str],
              config: dict[str, Any] | None = None, *, timeout: float | None = None,
              progress: Callable[[str, float], None] | None = None, **options: Any) -> dict[str, Any]:
        """`graphprune.prune` on the server: submit, wait, download to `output`; → the report."""
        job = self.submit(model, config, **options)
        self.wait(job["id"], timeout=timeout, progress=progress)
        self.download(job["id"], output)
        return self.report(job["id"])

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        return self._send(method, url, **kwargs).json()

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        with self._reachable():
            response = self._http.request(method, url, **kwargs)
        self._check(response)
        return response

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        """httpx's network errors as ServerUnreachableError: a cause of its own, worth a retry; a URL
        without http(s):// is the caller's mistake, a usage error."""
        try:
            yield
        except httpx.UnsupportedProtocol as exc:
            raise UsageError(f"server URL {self.url!r} is not usable: {exc} (e.g. {DEFAULT_URL})") from exc
        except httpx.TransportError as exc:
            raise ServerUnreachableError(f"cannot reach the graphprune server at {self.url}: {exc}; "
                                         "is `graphprune serve` running at that URL?") from exc

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.is_success:
            return
        response.read()
        try:
            problem = response.json()
        except ValueError:
            problem = {"detail": response.text}
        detail = problem.get("detail") or response.reason_phrase
        raise ServiceError(f"server answered {response.status_code}: {detail}", response.status_code, problem)


def _chunks(f: Any) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk
