"""Response bodies as documented in the OpenAPI spec (and checked against it by schemathesis)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from service.jobs import Job, Status


class JobErrorView(BaseModel):
    kind: str = Field(description="the library's error class (e.g. InvalidModelError) or a service reason "
                                  "(Timeout, MemoryLimit, CpuLimit, WorkerCrashed, Interrupted, InternalError)")
    message: str
    exit_code: int = Field(description="what `graphprune prune` would have exited with")


class JobView(BaseModel):
    id: str
    status: Status
    stage: str = Field(description="the last pipeline stage reached")
    progress: float = Field(ge=0.0, le=1.0)
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None = Field(description="when the result and report are deleted (then 410)")
    attempts: int
    options: dict[str, Any]
    input_bytes: int
    input_sha256: str
    result_bytes: int | None
    result_sha256: str | None
    error: JobErrorView | None
    links: dict[str, str]

    @classmethod
    def of(cls, job: Job) -> JobView:
        base = f"/v1/jobs/{job.id}"
        return cls(
            id=job.id, status=job.status, stage=job.stage, progress=job.progress, attempts=job.attempts,
            created_at=datetime.fromtimestamp(job.created_at, UTC), started_at=_time(job.started_at),
            finished_at=_time(job.finished_at), expires_at=_time(job.expires_at), options=job.options,
            input_bytes=job.input_bytes, input_sha256=job.input_sha256,
            result_bytes=job.result_bytes, result_sha256=job.result_sha256,
            error=JobErrorView(**job.error.__dict__) if job.error else None,
            links={"self": base, "result": f"{base}/result", "report": f"{base}/report", "events": f"{base}/events"},
        )


class JobPage(BaseModel):
    items: list[JobView]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page; null on the last")


class Health(BaseModel):
    status: str
    queued: int | None = None
    running: int | None = None


def _time(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)
