"""Every error is an RFC 9457 `application/problem+json` body whose `detail` names the problem.

Routes raise `Problem`; framework errors (unknown route, wrong method, parameter validation) and
unexpected exceptions are turned into the same shape here, so clients parse one format.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

log = logging.getLogger("graphprune.service")
MEDIA_TYPE = "application/problem+json"


class ProblemBody(BaseModel):
    """The problem+json schema (RFC 9457) as documented in the OpenAPI spec."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


class Problem(Exception):
    def __init__(self, status: int, detail: str, *, headers: Mapping[str, str] | None = None,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})
        self.errors = errors


def problem_response(problem: Problem) -> JSONResponse:
    body = ProblemBody(title=HTTPStatus(problem.status).phrase, status=problem.status, detail=problem.detail,
                       errors=problem.errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=problem.status, headers=problem.headers,
                        media_type=MEDIA_TYPE)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the problems a route can answer."""
    schema = {"$ref": "#/components/schemas/ProblemBody"}
    return {s: {"description": HTTPStatus(s).phrase, "content": {MEDIA_TYPE: {"schema": schema}}} for s in statuses}


def document_validation_errors(schema: dict[str, Any]) -> None:
    """FastAPI documents its parameter-validation 422 as `application/json` with its own body; the
    handler below sends problem+json, so the spec says that instead (and drops the unused schemas)."""
    problem = responses(422)[422]
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if "422" in operation.get("responses", {}):
                operation["responses"]["422"] = problem
    for unused in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(unused, None)


def install(app: FastAPI) -> None:
    async def on_problem(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != HTTPStatus(exc.status_code).phrase \
            else _HTTP_DETAILS.get(exc.status_code, HTTPStatus(exc.status_code).description)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names the methods of one route; a path may have several
            headers["Allow"] = _allowed(request)
        return problem_response(Problem(exc.status_code, detail, headers=headers))

    async def on_invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
        detail = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
        return problem_response(Problem(422, detail, errors=errors))

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem_response(Problem(500, "internal server error; the server log has the traceback"))

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(Exception, on_crash)


_HTTP_DETAILS = {
    404: "no such resource; the API lives under /v1 (see /docs)",
    405: "method not allowed on this resource (see /docs)",
}


def _allowed(request: Request) -> str:
    """The documented methods of the path template that `request` matches."""
    for template, operations in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), request.url.path):
            return ", ".join(sorted(method.upper() for method in operations))
    return ""


def _where(loc: Sequence[str]) -> str:
    kinds = {"query": "query parameter", "path": "path parameter", "header": "header", "body": "body"}
    if len(loc) >= 2 and loc[0] in kinds:
        return f"{kinds[loc[0]]} {'.'.join(loc[1:])!r}"
    return ".".join(loc) or "request"
