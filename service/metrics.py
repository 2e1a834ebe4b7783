"""Prometheus metrics: one registry per app (tests build many apps), job gauges read from the store."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.jobs import Job, JobStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _JobGauges(Collector):
    def __init__(self, store: JobStore) -> None:
        self._store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("graphprune_jobs", "Jobs in the store by status", labels=["status"])
        for status, count in self._store.counts().items():
            gauge.add_metric([status.value], count)
        yield gauge


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.submitted = Counter("graphprune_jobs_submitted", "Jobs accepted", registry=self.registry)
        self.finished = Counter("graphprune_jobs_finished", "Jobs that ended, by status", ["status"],
                                registry=self.registry)
        self.duration = Histogram("graphprune_job_duration_seconds", "Worker run time of finished jobs",
                                  buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, float("inf")),
                                  registry=self.registry)
        self.requests = Counter("graphprune_http_requests", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=self.registry)

    def watch(self, store: JobStore) -> None:
        """Report the store's job counts (once the app has opened it)."""
        self.registry.register(_JobGauges(store))

    def job_finished(self, job: Job) -> None:
        self.finished.labels(job.status.value).inc()
        if job.started_at is not None and job.finished_at is not None:
            self.duration.observe(job.finished_at - job.started_at)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware: counts responses by route template, so ids do not explode the label space."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
