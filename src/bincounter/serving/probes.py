"""Liveness, readiness and metrics: ``GET /healthz``, ``GET /readyz``, ``GET /metrics``."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from bincounter.serving.batching import ProcessRunner
from bincounter.serving.loading import ModelState
from bincounter.serving.metrics import ServerMetrics


def readiness(state: ModelState) -> JSONResponse:
    """200 with the model's URI, version, engine and worker pids once loaded; 503 before (or after
    a failed load, with the error)."""
    body: dict[str, Any] = {"status": state.status, "model_uri": state.model_uri, "pid": os.getpid()}
    if state.version:
        body["model_version"] = state.version
    if state.info is not None:
        body["backend"] = state.info.backend
    if isinstance(state.runner, ProcessRunner) and state.ready:
        body["worker_pids"] = [w.pid for w in state.runner.processes if w.pid is not None]
    if not state.ready and state.problem:
        body["error"] = state.problem
    return JSONResponse(body, status_code=200 if state.ready else 503)


def router(state: ModelState, metrics: ServerMetrics) -> APIRouter:
    probes = APIRouter(tags=["probes"])

    @probes.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @probes.get("/readyz")
    def readyz() -> JSONResponse:
        """Readiness: 200 once the model is loaded, 503 before (or if loading failed)."""
        return readiness(state)

    @probes.get("/metrics")
    def prometheus_metrics() -> Response:
        """Prometheus metrics (text exposition format)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return probes
