"""The ASGI app: `create_app(settings)` wires routes, problem handlers, metrics and the lifespan
(recover and start on the way up, drain on the way down)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from graphprune import __version__
from service import api, page, problems
from service.metrics import Metrics, RequestCounter
from service.runtime import Runtime
from service.settings import Settings

DESCRIPTION = """Prune ONNX models over HTTP. `POST /v1/jobs` with the model as the body, follow
`Location` (or its `/events`), then download `/result` and `/report`. Errors are
`application/problem+json`. A person can use the page at `/`."""
DOCS_ASSETS = "/static/docs"  # Swagger UI and ReDoc, served from the fastapi-offline wheel: /docs works offline


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = await Runtime.start(settings, metrics)
        app.state.runtime = rt
        try:
            yield
        finally:
            rt.closing = True
            await rt.stop()
            app.state.runtime = None

    app = FastAPI(title="graphprune", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.add_middleware(RequestCounter, metrics=metrics)
    problems.install(app)
    app.include_router(api.jobs)
    app.include_router(api.health)
    _add_pages(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {})["ProblemBody"] = problems.ProblemBody.model_json_schema()
            problems.document_validation_errors(schema)
            if settings.api_token is None:  # this server takes no token: say so, or clients will send one
                components.pop("securitySchemes", None)
                for operations in schema["paths"].values():
                    for operation in operations.values():
                        operation.pop("security", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _add_pages(app: FastAPI) -> None:
    """`/` for a person, `/docs` and `/redoc` on bundled assets (FastAPI's defaults load them from a CDN,
    which is a blank page offline)."""
    assets = resources.files("fastapi_offline") / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page.index())

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} API",
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)


class DrainingServer(uvicorn.Server):
    """uvicorn, telling the app when shutdown begins: uvicorn waits for open connections before the
    lifespan shutdown, so an open `/events` stream never learnt of it and was cut when the graceful
    timeout ran out (a protocol error for the client). Marking the runtime closing first lets streams
    send a final event and end, and new submissions get 503 while the server drains."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: Any = None) -> None:
        rt: Runtime | None = getattr(self._app.state, "runtime", None)
        if rt is not None:
            rt.closing = True
        await super().shutdown(sockets)


def serve(settings: Settings, host: str, port: int, log_level: str = "info") -> None:
    """`graphprune serve`: the app under uvicorn until SIGINT/SIGTERM (uvicorn re-raises the signal once
    it has shut down; as with `uvicorn.run`, the resulting KeyboardInterrupt is a clean exit)."""
    app = create_app(settings)
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5), app)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
