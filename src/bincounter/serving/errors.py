"""Every error as a JSON answer, after draining what the client is still sending (so it reads the
answer on an open connection instead of a reset)."""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from bincounter.config import ServeConfig

log = logging.getLogger("bincounter.serving")
DRAIN_SECONDS = 10.0


def jsonable(errors: Any) -> Any:
    """FastAPI's validation errors with anything that is not JSON made a string."""
    return json.loads(json.dumps(errors, default=str))


def install(app: FastAPI, cfg: ServeConfig) -> None:
    """The app's exception handlers."""

    async def drain(request: Request) -> None:
        scope_state = request.scope.get("state", {})
        if scope_state.get("body_complete", True) or request.method in ("GET", "HEAD", "OPTIONS"):
            return
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > cfg.max_drain_bytes:
            return  # too much to read for nothing: the connection closes after the answer
        drained = 0
        try:
            with anyio.move_on_after(DRAIN_SECONDS):
                while not scope_state.get("body_complete", True) and drained <= cfg.max_drain_bytes:
                    message = await request.receive()
                    drained += len(message.get("body", b""))
        except (OSError, RuntimeError):
            pass

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        await drain(request)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        await drain(request)
        return JSONResponse({"detail": jsonable(exc.errors())}, status_code=422)

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody reads this answer; it keeps a vanished client out of the 5xx counts.
        return JSONResponse({"detail": "client disconnected before sending the whole body"}, status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)
