"""Helpers for the service tests: the app driven in process (httpx ASGI transport, lifespan run by
hand) and a real uvicorn server on 127.0.0.1 in a thread. Test modules are named test_service_*
and this folder has no __init__.py, so nothing here shadows the `service` package."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from graphprune.demo import demo_model
from service.app import DrainingServer, create_app
from service.runtime import Runtime
from service.settings import Settings

DEMO = demo_model().SerializeToString()
OCTET = {"Content-Type": "application/octet-stream"}
TERMINAL = ("succeeded", "failed", "cancelled")
FAST = {"latency_runs": 0}  # the demo prunes in ~0.1 s once the worker has imported the library


class Api:
    """An httpx client on the app plus the calls most tests repeat."""

    def __init__(self, client: httpx.AsyncClient, app: FastAPI) -> None:
        self.client = client
        self.app = app

    @property
    def runtime(self) -> Runtime:
        rt: Runtime = self.app.state.runtime
        return rt

    async def submit(self, body: bytes = DEMO, headers: dict[str, str] | None = None,
                     **params: Any) -> httpx.Response:
        return await self.client.post("/v1/jobs", params={**FAST, **params}, content=body,
                                      headers=headers or OCTET)

    async def job(self, body: bytes = DEMO, **params: Any) -> dict[str, Any]:
        response = await self.submit(body, **params)
        assert response.status_code == 202, response.text
        job: dict[str, Any] = response.json()
        return job

    async def wait(self, job_id: str, until: Callable[[dict[str, Any]], bool] = lambda j: j["status"] in TERMINAL,
                   timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job: dict[str, Any] = (await self.client.get(f"/v1/jobs/{job_id}")).json()
            if until(job):
                return job
            assert time.monotonic() < deadline, f"job still {job['status']}/{job['stage']} after {timeout} s"
            await asyncio.sleep(0.05)


@asynccontextmanager
async def asgi(settings: Settings) -> AsyncIterator[Api]:
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=30) as client:
        yield Api(client, app)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 in a thread, as `graphprune serve` runs it (DrainingServer);
    stops (lifespan shutdown included) on exit."""
    with live_app(settings) as (url, _):
        yield url


@contextmanager
def live_app(settings: Settings) -> Iterator[tuple[str, FastAPI]]:
    """`live_server`, and its app (whose `state.runtime` the server's event loop thread runs)."""
    app = create_app(settings)
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           timeout_graceful_shutdown=2), app)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}", app
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "uvicorn did not shut down"
