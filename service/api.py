"""Routes only: validate the request, talk to the store and the executor, answer (problem+)JSON.

Store calls are sub-millisecond SQLite statements; plain `def` routes run them in the thread pool,
async routes are the ones that stream (uploads, server-sent events, cancelling a worker).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from graphprune.report import html
from service import options, problems, upload
from service.jobs import Job, Status
from service.metrics import CONTENT_TYPE
from service.problems import Problem
from service.runtime import Runtime
from service.schemas import Health, JobPage, JobView

POLL_AFTER_S = "1"  # Retry-After for a job that is not done yet
EVENT_POLL_S = 0.2
EVENT_KEEPALIVE_S = 15.0

_bearer = HTTPBearer(auto_error=False, description="GRAPHPRUNE_API_TOKEN, when the server sets one")


def runtime(request: Request) -> Runtime:
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        raise Problem(503, "the server is starting or stopping", headers={"Retry-After": "1"})
    return rt


Rt = Annotated[Runtime, Depends(runtime)]


def authorize(rt: Rt, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    token = rt.settings.api_token
    if token is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Problem(401, "missing or wrong bearer token: send 'Authorization: Bearer <GRAPHPRUNE_API_TOKEN>'",
                      headers={"WWW-Authenticate": "Bearer"})


jobs = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(authorize)],
                 responses=problems.responses(401, 503))
health = APIRouter(tags=["operations"])

_BODY = {
    "required": True,
    "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": [upload.MODEL_PART],
            "properties": {upload.MODEL_PART: {"type": "string", "format": "binary"},
                           options.CONFIG_PARAM: {"type": "string", "description": "JSON object of options"}},
            "additionalProperties": {"type": "string", "description": "an option, as in the query string"},
        }},
        upload.JSON_MEDIA: {"schema": {
            "type": "object", "required": [options.SOURCE],
            "description": "prune a model from the server's MLflow registry instead of an upload (needs "
                           "MLFLOW_TRACKING_URI on the server); query parameters override these options",
            "properties": {
                options.SOURCE: {"type": "string", "pattern": "^(models|runs):/.+",
                                 "description": "models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH"},
                options.REGISTER_AS: {"type": "string", "description": "register the result as a new version of "
                                                                       "this registered model"},
                options.CONFIG_PARAM: {"type": "object", "description": "options, named as in the query string"},
            },
            "additionalProperties": {"description": "an option, as in the query string"},
        }},
    },
}
_EVENT = {  # one event (OpenAPI 3.1 reads an event stream's schema per event)
    "type": "object", "required": ["id", "data"],
    "properties": {"id": {"type": "string"}, "data": {
        "type": "string", "contentMediaType": "application/json",
        "contentSchema": {"$ref": "#/components/schemas/JobView"}}},
}
_ACCEPTED = {"description": "accepted; poll Location", "headers": {
    "Location": {"schema": {"type": "string"}, "description": "the job"},
    "Retry-After": {"schema": {"type": "integer"}, "description": "seconds until a poll is worthwhile"},
}}


@jobs.post("", status_code=202, response_model=JobView,
           responses={202: _ACCEPTED, **problems.responses(400, 409, 413, 415, 422, 424, 429, 507)},
           openapi_extra={"parameters": options.openapi_parameters(), "requestBody": _BODY})
async def submit(request: Request, rt: Rt,
                 idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> JSONResponse:
    """Upload a model (raw .onnx body, or a multipart form with a `model` file) and queue a pruning job;
    or name a model in the server's MLflow registry with a JSON body `{"source": "models:/NAME/VERSION"}`.

    Options are query parameters (or form fields, or a JSON `config`), checked before the body is read.
    424: the MLflow store could not be reached.
    """
    declared = request.headers.get("content-length", "")
    with rt.admission(int(declared) if declared.isdigit() else 0):
        query = list(request.query_params.multi_items())
        opts = options.parse(query)
        if upload.media_type(request) == upload.JSON_MEDIA:
            opts = options.parse_json(query, await upload.receive_json(request))
            body = await upload.fetch(opts[options.SOURCE], rt.artifacts.root, rt.artifacts.uploads,
                                      rt.settings.max_upload_bytes)
        else:
            body = await upload.receive(request, rt.artifacts.uploads, rt.settings.max_upload_bytes)
        try:
            if body.fields:
                opts = options.parse(query + body.fields)
            job = rt.accept(body, options.capped(opts, rt.settings), idempotency_key)
        finally:
            body.path.unlink(missing_ok=True)
    return JSONResponse(JobView.of(job).model_dump(mode="json"), status_code=202,
                        headers={"Location": f"/v1/jobs/{job.id}", "Retry-After": POLL_AFTER_S})


@jobs.get("", response_model=JobPage, responses=problems.responses(422))
def list_jobs(rt: Rt, limit: Annotated[int, Query(ge=1, le=200)] = 50,
              cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$")] = None,
              status: Status | None = None) -> JobPage:
    """Jobs, newest first, `limit` per page."""
    page = rt.store.page(limit + 1, int(cursor) if cursor else None, status)
    more = len(page) > limit
    return JobPage(items=[JobView.of(j) for j in page[:limit]], next_cursor=str(page[limit - 1].seq) if more else None)


@jobs.get("/{job_id}", response_model=JobView, responses=problems.responses(404))
def get_job(job_id: str, rt: Rt) -> JobView:
    return JobView.of(_job(rt, job_id))


@jobs.head("/{job_id}/result", response_class=FileResponse, summary="Headers of the result", responses={
    200: {"description": "size and ETag of the pruned model, without the body",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    304: {"description": "If-None-Match matched"}, **problems.responses(404, 409, 410)})
@jobs.get("/{job_id}/result", response_class=FileResponse, responses={
    200: {"description": "the pruned model", "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}},
        "headers": {"ETag": {"schema": {"type": "string"}, "description": "quoted sha256 of the body"}}},
    304: {"description": "If-None-Match matched"},
    **problems.responses(404, 409, 410)})
def get_result(job_id: str, rt: Rt, if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The pruned model; its ETag is its sha256."""
    job = _job(rt, job_id)
    path = _artifact(rt, job, rt.artifacts.result(job_id))
    etag = f'"{job.result_sha256}"'
    if if_none_match and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers={"ETag": etag})
    return FileResponse(path, media_type="application/octet-stream", filename=f"{job_id}.pruned.onnx",
                        headers={"ETag": etag})


_REPORT = {"application/json": {"schema": {"type": "object"}}, "text/html": {}}


@jobs.head("/{job_id}/report", summary="Headers of the report", responses={
    200: {"description": "the report's headers, without the body", "content": _REPORT},
    **problems.responses(404, 409, 410, 422)})
@jobs.get("/{job_id}/report", responses={
    200: {"description": "the report (see README, 'The report'); with `Accept: text/html` (a browser) or "
                         "`format=html`, the same report as one self-contained HTML page with plots",
          "content": _REPORT},
    **problems.responses(404, 409, 410, 422)})
def get_report(job_id: str, rt: Rt, accept: Annotated[str, Header()] = "",
               format: Annotated[Literal["json", "html"] | None, Query(
                   description="json or html; overrides Accept")] = None) -> Response:
    job = _job(rt, job_id)
    path = _artifact(rt, job, rt.artifacts.report(job_id))
    if format == "html" or (format is None and "text/html" in accept):
        return HTMLResponse(html.render(json.loads(path.read_text()), f"graphprune job {job_id}"))
    return FileResponse(path, media_type="application/json")


@jobs.get("/{job_id}/events", response_class=StreamingResponse, responses={
    200: {"description": "server-sent events: one `data:` job JSON per change, until the job ends",
          "content": {"text/event-stream": {"schema": _EVENT}}},
    **problems.responses(404)})
def job_events(job_id: str, rt: Rt) -> StreamingResponse:
    _job(rt, job_id)
    return StreamingResponse(_events(rt, job_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@jobs.delete("/{job_id}", response_model=JobView, responses={
    200: {"description": "the job was queued or running and is now cancelled; its worker is stopped"},
    204: {"description": "the job had ended and is deleted with its files"},
    **problems.responses(404)})
async def delete_job(job_id: str, rt: Rt) -> Response:
    """Cancel a queued or running job, or delete a finished one."""
    job = await rt.cancel_or_delete(job_id)
    if job is None:
        return Response(status_code=204)
    return JSONResponse(JobView.of(job).model_dump(mode="json"))


@health.get("/livez", response_model=Health, response_model_exclude_none=True)
@health.get("/v2/health/live", response_model=Health, response_model_exclude_none=True)
def live() -> Health:
    """The process answers."""
    return Health(status="live")


@health.get("/readyz", response_model=Health, responses=problems.responses(503))
@health.get("/v2/health/ready", response_model=Health, responses=problems.responses(503))
def ready(rt: Rt) -> Health:
    """The server accepts jobs: not shutting down, the store answers, the data directory is writable
    and has GRAPHPRUNE_MIN_FREE_BYTES free, and the executor can run jobs."""
    if rt.closing:
        raise Problem(503, "the server is shutting down")
    try:
        counts = rt.store.counts()
    except Exception as exc:  # sqlite3.Error, OSError: a locked, corrupt or vanished database
        raise Problem(503, f"the job store does not answer: {type(exc).__name__}: {exc}") from None
    if (why := rt.executor.unavailable()) is not None:
        raise Problem(503, why)
    if (short := rt.disk_shortfall()) is not None:
        raise Problem(503, short)
    probe = rt.artifacts.uploads / ".ready"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise Problem(503, f"the data directory is not writable: {exc}") from None
    return Health(status="ready", queued=counts[Status.QUEUED], running=counts[Status.RUNNING])


@health.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
def metrics(rt: Rt) -> Response:
    return Response(rt.metrics.render(), media_type=CONTENT_TYPE)


def _job(rt: Runtime, job_id: str) -> Job:
    job = rt.store.get(job_id)
    if job is None:
        raise Problem(404, f"no job {job_id!r} (deleted, or never created)")
    return job


def _artifact(rt: Runtime, job: Job, path: Path) -> Path:
    if job.status != Status.SUCCEEDED:
        why = f": {job.error.kind}: {job.error.message}" if job.error else ""
        headers = {} if job.status.terminal else {"Retry-After": POLL_AFTER_S}
        raise Problem(409, f"job {job.id} is {job.status}{why}; there is no result", headers=headers)
    if (job.expires_at is not None and job.expires_at <= time.time()) or not path.is_file():
        raise Problem(410, f"the result of job {job.id} expired (GRAPHPRUNE_RESULT_TTL_S) and was deleted")
    return path


async def _events(rt: Runtime, job_id: str) -> AsyncIterator[str]:
    last: tuple[Any, ...] | None = None
    quiet_since = time.monotonic()
    seq = 0
    while True:
        job = rt.store.get(job_id)
        if job is None:
            return
        state = (job.status, job.stage, job.progress)
        if state != last:
            last, seq, quiet_since = state, seq + 1, time.monotonic()
            yield f"id: {seq}\ndata: {json.dumps(JobView.of(job).model_dump(mode='json'))}\n\n"
        elif time.monotonic() - quiet_since > EVENT_KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        if job.status.terminal:
            return
        if rt.closing:  # a last event that says so, then a clean end of the stream
            seq += 1
            yield f"event: shutdown\nid: {seq}\ndata: {json.dumps(JobView.of(job).model_dump(mode='json'))}\n\n"
            return
        await asyncio.sleep(EVENT_POLL_S)
