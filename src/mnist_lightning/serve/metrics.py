"""Prometheus metrics at ``GET /metrics``: requests by route and status, their latency, images predicted.

Routes are labelled by their template (``/predict``, ``/v2/models/{model_name}/infer``), and every path
the app does not serve by one label, ``other``: a scanner trying a million paths adds one series, not
a million. With ``--workers N`` the workers count in prometheus-client's multiprocess mode: each writes
its values to files in the folder ``$PROMETHEUS_MULTIPROC_DIR`` names (the command makes a private one
and removes it when it stops), and a scrape, whichever worker answers it, adds up all of them.
"""

import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match

DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# From a 28x28 PNG on the event loop (under a millisecond) to a 12-megapixel photo queued behind others.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The server's metrics, in a registry of their own (the process's default one is left alone)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        if os.environ.get(DIR_VARIABLE):
            MultiProcessCollector(self.registry)  # reads every worker's files at each scrape
            own = None  # values go to this process's files, not to a registry
        else:
            own = self.registry
        self.requests = Counter(
            "mnist_http_requests", "HTTP requests answered, by route, method and status",
            ["route", "method", "status"], registry=own,
        )  # fmt: skip
        self.latency = Histogram(
            "mnist_http_request_duration_seconds", "Time from a request's arrival at the app to the end of its answer",
            ["route", "method"], buckets=BUCKETS, registry=own,
        )  # fmt: skip
        self.images = Counter(
            "mnist_images_predicted", "Images the network classified, by route", ["route"], registry=own
        )


def route_of(scope) -> str:
    """The template of the route that served ``scope``, or of the one it would have reached; else ``other``."""
    if "route" in scope:  # set by the router on the way in
        return scope["route"].path
    partial = "other"
    for route in scope["app"].routes:  # refused before the router (by Host or Origin): find it here
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route.path
        if match is Match.PARTIAL and partial == "other":
            partial = route.path
    return partial


class Measured:
    """ASGI middleware, the outermost: counts and times every answer, the app's refusals included."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # an app that raises before answering: uvicorn's 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route, method = route_of(scope), scope["method"]
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - start)


def images_predicted(request: Request, count: int) -> None:
    """Count ``count`` images classified by the route serving ``request``."""
    request.app.state.metrics.images.labels(route_of(request.scope)).inc(count)


def install(app: FastAPI) -> None:
    """Measure every request to ``app`` and answer ``GET /metrics``. Call it after the app's other middleware."""
    app.state.metrics = metrics = Metrics()
    app.add_middleware(Measured, metrics=metrics)

    @app.get("/metrics")
    async def scrape(request: Request) -> Response:
        # Open like /health: counts and timings, nothing of what was sent. The format is the one the
        # scraper asks for (Prometheus asks for OpenMetrics). Reading N workers' files is file I/O: off the loop.
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(await run_in_threadpool(encode, metrics.registry), media_type=content_type)
