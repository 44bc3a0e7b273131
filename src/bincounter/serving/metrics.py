"""What the model server tells its operators: Prometheus metrics and a JSON access log.

The metrics live in a registry of their own per app (``/metrics`` shows only them, and
several apps can live in one test process). Endpoints are labelled by route template
(``/v1/models/{name}:predict``), never by the raw path, so hostile URLs cannot blow up the
number of series.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

access_log = logging.getLogger("bincounter.access")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_COUNT_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 50, 100, 1000)


class ServerMetrics:
    """Every series the server exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bincounter_http_requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("bincounter_http_request_duration_seconds", "Time to answer a request.",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("bincounter_batch_size", "Images per model call (micro-batching).",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("bincounter_batch_duration_seconds", "Decode, preprocess and inference "
                                       "time of one batch in a worker.", buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("bincounter_queue_depth", "Images waiting for a worker.", registry=r)
        # What the HorizontalPodAutoscaler scales on (manifests/serving/hpa.yaml, via prometheus-adapter).
        self.in_flight = Gauge("bincounter_images_in_flight", "Images accepted and not yet answered (waiting or "
                               "in a worker's batch).", registry=r)
        self.queue_wait = Histogram("bincounter_queue_wait_seconds", "Time from arrival to answer of an image.",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.predicted_count = Histogram("bincounter_predicted_count", "Counts predicted (distribution).",
                                         buckets=_COUNT_BUCKETS, registry=r)
        self.images = Counter("bincounter_images", "Images answered, by outcome status.", ["status"], registry=r)
        self.rejected = Counter("bincounter_load_shed", "Requests refused with 503 because the queue was full.",
                                registry=r)
        self.workers_alive = Gauge("bincounter_workers_alive", "Inference workers running.", registry=r)
        self.worker_restarts = Counter("bincounter_worker_restarts", "Workers replaced after dying or hanging.",
                                       registry=r)
        self.model_info = Gauge("bincounter_model_info", "The served model (value 1).",
                                ["model_uri", "version", "backend"], registry=r)


class ObservabilityMiddleware:
    """Pure ASGI middleware: request metrics and one JSON access-log line per request.

    It also records in ``scope["state"]["body_complete"]`` whether the request body has been
    read to its end, which the error handler uses to drain unread bodies.
    """

    def __init__(self, app: Any, metrics: ServerMetrics, log_requests: bool = True):
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state["body_complete"] = False
        status = 500
        received = 0

        async def receive_tracked() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    state["body_complete"] = True
            elif message["type"] == "http.disconnect":
                state["body_complete"] = True
            return message

        async def send_tracked(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive_tracked, send_tracked)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(elapsed)
            if self.log_requests:
                client = scope.get("client") or ("", 0)
                access_log.info(json.dumps({
                    "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
                    "client": f"{client[0]}:{client[1]}",
                    "method": scope.get("method"),
                    "path": scope.get("path", "")[:200],
                    "endpoint": endpoint,
                    "status": status,
                    "ms": round(elapsed * 1000, 2),
                    "bytes_in": received,
                }))


class JsonFormatter(logging.Formatter):
    """Log records as JSON lines (the access log's lines are JSON already and pass through)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == access_log.name:
            return record.getMessage()
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)
