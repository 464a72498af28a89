"""Prometheus metrics of one app: request counts and latency by route, batch sizes, queue depth, in-flight requests.

Each app has its own CollectorRegistry, so several apps in one process (tests) never collide. With `--workers N`
each process exposes its own figures; scrape them through the process manager, or run one worker per container.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from api.limits import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The collectors; the middleware and the batcher feed them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("zoo_http_requests_total", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("zoo_http_request_duration_seconds", "HTTP request latency by route template",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("zoo_batch_size_images", "images per micro-batch forward pass",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("zoo_queue_depth", "inference requests waiting in the batch queue",
                                 registry=self.registry)
        self.inflight = Gauge("zoo_inflight_inference_requests", "inference requests admitted and not yet answered",
                              registry=self.registry)
        self.inference = Histogram("zoo_inference_duration_seconds", "time of one batched predictor call",
                                   buckets=LATENCY_BUCKETS, registry=self.registry)


class MetricsMiddleware:
    """ASGI middleware: counts every HTTP request by its route template (not the raw path: bounded labels)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - start)
