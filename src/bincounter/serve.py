"""HTTP model server: one image in, one count out.

One process serves three wire protocols over the same model so the same image runs
everywhere:

* the native API: ``POST /v1/count`` (raw image bytes) and ``POST /v1/count:batch``
  (multipart files), plus ``GET /healthz`` and ``GET /readyz`` probes;
* KServe v1: ``GET /v1/models/{name}`` and ``POST /v1/models/{name}:predict`` with
  ``{"instances": [{"image": {"b64": "..."}}]}``;
* SageMaker hosting: ``GET /ping`` and ``POST /invocations`` (raw image bytes).

The model is an MLflow pyfunc whose ``predict`` takes ``DataFrame({"image": [bytes]})``
and returns one row per image with ``count``, ``confidence``, ``expected_count`` and
``probabilities``; it raises ``ValueError`` on undecodable bytes.

Run it with ``python -m bincounter.serve --model-uri models:/bincounter@champion``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("bincounter.serve")

# Same default as DeployConfig, so a bare container serves the registry's champion.
DEFAULT_MODEL_URI = "models:/bincounter@champion"
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_BATCH = 64
# JSON and multipart requests carry several images, base64 inflates them by 4/3.
_MULTI_IMAGE_BODY_FACTOR = 4
REQUIRED_COLUMNS = ("count", "confidence", "expected_count", "probabilities")

_IMAGE_BODY = {
    "required": True,
    "content": {
        media: {"schema": {"type": "string", "format": "binary"}}
        for media in ("image/jpeg", "image/png", "application/octet-stream")
    },
}


class CountResult(BaseModel):
    """One image's prediction, as every endpoint returns it."""

    count: int
    confidence: float
    expected_count: float
    probabilities: list[float]
    model_uri: str


class KServeResponse(BaseModel):
    predictions: list[CountResult]


class _BadImage(Exception):
    """The model refused an image (it raised ValueError)."""

    def __init__(self, index: int | None, message: str):
        super().__init__(message)
        self.index = index
        self.message = message


class _ModelState:
    """What the endpoints need to know about the model, shared with the loader thread."""

    def __init__(self, model_uri: str, model: Any | None):
        self.model_uri = model_uri
        self.model = model
        self.status = "ready" if model is not None else "not_loaded"
        self.error: str | None = None
        self.load_seconds: float | None = None


def load_model(model_uri: str) -> Any:
    """Load an MLflow pyfunc model.

    ``models:/`` and ``runs:/`` URIs need a tracking server; without
    ``$MLFLOW_TRACKING_URI`` the project's local SQLite store is used, so a server started
    next to ``bincounter register`` finds the model it registered.
    """
    import mlflow.pyfunc

    if model_uri.startswith(("models:/", "runs:/")) and not os.environ.get("MLFLOW_TRACKING_URI"):
        from bincounter import paths

        mlflow.set_tracking_uri(paths.default_tracking_uri())
    return mlflow.pyfunc.load_model(model_uri)


def create_app(
    model_uri: str,
    model: Any | None = None,
    *,
    loader: Callable[[str], Any] | None = None,
    model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
    inference_concurrency: int | None = None,
) -> FastAPI:
    """Build the FastAPI app serving ``model_uri``.

    Args:
        model_uri: MLflow model URI; reported in every answer and loaded at startup when
            ``model`` is None.
        model: an already loaded model (tests, notebooks); skips loading.
        loader: replaces :func:`load_model` (tests).
        model_name: the only name accepted on the KServe routes; None accepts any name,
            so the server works whatever the InferenceService is called.
        max_body_bytes: largest single image accepted (413 above it).
        max_batch: most images in one batch or KServe request.
        inference_concurrency: predictions running at once (default
            ``$BINCOUNTER_INFERENCE_CONCURRENCY`` or 1: torch already uses every core for
            one call, so more would only oversubscribe the CPU).

    The model loads in a background thread started by the lifespan handler, so
    ``/healthz`` answers during a long download while ``/readyz`` says 503.
    """
    state = _ModelState(model_uri, model)
    load = loader or load_model
    if inference_concurrency is None:
        inference_concurrency = int(os.environ.get("BINCOUNTER_INFERENCE_CONCURRENCY", "1"))
    if inference_concurrency < 1:
        raise ValueError("inference_concurrency must be at least 1")
    multi_body_bytes = max_body_bytes * _MULTI_IMAGE_BODY_FACTOR
    limiter_box: list[anyio.CapacityLimiter] = []

    def _load_in_background(app: FastAPI) -> None:
        state.status = "loading"
        started = time.perf_counter()
        log.info("loading model %s", model_uri)
        try:
            loaded = load(model_uri)
        except BaseException as exc:  # noqa: BLE001 - any failure must reach /readyz and the log
            state.error = f"{type(exc).__name__}: {exc}"
            state.status = "failed"
            log.exception("could not load model %s", model_uri)
            on_failure = getattr(app.state, "on_load_failure", None)
            if on_failure is not None:
                on_failure(exc)
            return
        state.load_seconds = time.perf_counter() - started
        state.model = loaded
        state.status = "ready"
        log.info("model %s loaded in %.1f s", model_uri, state.load_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The limiter must be created inside the running event loop.
        limiter_box.append(anyio.CapacityLimiter(inference_concurrency))
        if state.model is None and state.status == "not_loaded":
            threading.Thread(
                target=_load_in_background, args=(app,), name="model-loader", daemon=True
            ).start()
        yield

    app = FastAPI(
        title="bincounter",
        summary="Count the items in a warehouse bin photo.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.model_state = state

    # -- helpers -------------------------------------------------------------------

    def _require_model() -> Any:
        if state.model is None:
            detail = f"model {model_uri} is not loaded ({state.status})"
            if state.error:
                detail += f": {state.error}"
            raise HTTPException(503, detail=detail, headers={"Retry-After": "5"})
        return state.model

    async def _read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                raise HTTPException(400, detail="invalid Content-Length header") from None
            # Refuse before reading anything: no point buffering 2 GB to reject it.
            if declared_bytes > limit:
                raise HTTPException(413, detail=f"body of {declared_bytes} bytes exceeds the {limit}-byte limit")
        body = bytearray()
        # Chunked uploads have no Content-Length, so count as we go.
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, detail=f"body exceeds the {limit}-byte limit")
        return bytes(body)

    def _predict_sync(model: Any, images: list[bytes]) -> list[dict[str, Any]]:
        import pandas as pd

        try:
            out = model.predict(pd.DataFrame({"image": images}))
        except ValueError as exc:
            if len(images) == 1:
                raise _BadImage(0, str(exc)) from exc
            # One bad image fails the whole batch; find which one so the client can fix it.
            for i, image in enumerate(images):
                try:
                    model.predict(pd.DataFrame({"image": [image]}))
                except ValueError as single_exc:
                    raise _BadImage(i, str(single_exc)) from single_exc
            raise _BadImage(None, str(exc)) from exc
        return _rows(out, len(images), model_uri)

    async def _predict(images: list[bytes], labels: list[str] | None = None) -> list[dict[str, Any]]:
        model = _require_model()
        try:
            return await anyio.to_thread.run_sync(_predict_sync, model, images, limiter=limiter_box[0] if limiter_box else None)
        except _BadImage as exc:
            where = ""
            if exc.index is not None and len(images) > 1:
                where = f" ({labels[exc.index] if labels else f'instance {exc.index}'})"
            raise HTTPException(422, detail=f"could not decode the image{where}: {_truncate(exc.message)}") from None

    async def _count_raw(request: Request) -> dict[str, Any]:
        body = await _read_body(request, max_body_bytes)
        if not body:
            raise HTTPException(400, detail="empty body: send the image bytes (JPEG or PNG) as the request body")
        return (await _predict([body]))[0]

    # -- probes ----------------------------------------------------------------------

    @app.get("/healthz", tags=["probes"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    def _readiness() -> JSONResponse:
        body: dict[str, Any] = {"status": state.status, "model_uri": model_uri, "pid": os.getpid()}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if state.model is not None else 503)

    @app.get("/readyz", tags=["probes"])
    def readyz() -> JSONResponse:
        """Readiness: 200 once the model is loaded, 503 before (or if loading failed)."""
        return _readiness()

    # -- native API ------------------------------------------------------------------

    @app.post("/v1/count", response_model=CountResult, tags=["count"], openapi_extra={"requestBody": _IMAGE_BODY})
    async def count(request: Request) -> dict[str, Any]:
        """Count the items in one image sent as the raw request body."""
        return await _count_raw(request)

    @app.post(
        "/v1/count:batch",
        response_model=list[CountResult],
        tags=["count"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                        }
                    }
                },
            }
        },
    )
    async def count_batch(request: Request) -> list[dict[str, Any]]:
        """Count several images sent as multipart files (any field name), in order."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(400, detail="send the images as multipart/form-data files")
        body = await _read_body(request, multi_body_bytes)

        # The body is already read (to enforce the limit); replay it to the form parser.
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=max_batch, max_fields=max_batch, max_part_size=max_body_bytes
            )
        except AssertionError as exc:  # starlette's way of saying python-multipart is missing
            raise HTTPException(501, detail=f"batch uploads are unavailable: {exc}") from None
        except StarletteHTTPException:
            raise
        except Exception as exc:  # noqa: BLE001 - malformed bodies raise parser-specific errors
            raise HTTPException(400, detail=f"malformed multipart body: {exc}") from None
        images: list[bytes] = []
        labels: list[str] = []
        try:
            for key, value in form.multi_items():
                if isinstance(value, str):
                    continue
                data = await value.read()
                if len(data) > max_body_bytes:
                    raise HTTPException(413, detail=f"file {value.filename!r} exceeds the {max_body_bytes}-byte limit")
                if not data:
                    raise HTTPException(400, detail=f"file {value.filename or key!r} is empty")
                images.append(data)
                labels.append(f"file {value.filename or key!r}")
        finally:
            await form.close()
        if not images:
            raise HTTPException(400, detail="no files in the multipart body")
        return await _predict(images, labels)

    # -- KServe v1 -------------------------------------------------------------------

    def _check_name(name: str) -> None:
        if model_name is not None and name != model_name:
            raise HTTPException(404, detail=f"model {name!r} does not exist (this server serves {model_name!r})")

    @app.get("/v1/models", tags=["kserve"])
    def kserve_list() -> dict[str, list[str]]:
        """KServe v1: the served model names."""
        return {"models": [model_name or "bincounter"]}

    @app.post("/v1/models/{name}:predict", response_model=KServeResponse, tags=["kserve"])
    async def kserve_predict(name: str, request: Request) -> dict[str, Any]:
        """KServe v1 predict: ``{"instances": [{"image": {"b64": "..."}}]}``."""
        _check_name(name)
        raw = await _read_body(request, multi_body_bytes)
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPException(400, detail=f"body is not valid JSON: {exc}") from None
        images = _decode_instances(payload, max_batch, max_body_bytes)
        return {"predictions": await _predict(images)}

    @app.get("/v1/models/{name}", tags=["kserve"])
    def kserve_ready(name: str) -> JSONResponse:
        """KServe v1 model readiness: 200 when loaded, else 503."""
        _check_name(name)
        ready = state.model is not None
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    # -- SageMaker hosting -----------------------------------------------------------

    @app.get("/ping", tags=["sagemaker"])
    def ping() -> JSONResponse:
        """SageMaker health check: 200 when the model is loaded."""
        return _readiness()

    @app.post("/invocations", response_model=CountResult, tags=["sagemaker"], openapi_extra={"requestBody": _IMAGE_BODY})
    async def invocations(request: Request) -> dict[str, Any]:
        """SageMaker inference: raw image bytes in, the same JSON as ``/v1/count`` out."""
        return await _count_raw(request)

    return app


def _decode_instances(payload: Any, max_batch: int, max_image_bytes: int) -> list[bytes]:
    """KServe v1 instances -> image bytes; accepts ``{"image": {"b64": s}}``, ``{"image": s}``, ``{"b64": s}``."""
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        raise HTTPException(400, detail='expected {"instances": [{"image": {"b64": "..."}}, ...]}')
    instances = payload["instances"]
    if not instances:
        raise HTTPException(400, detail="instances is empty")
    if len(instances) > max_batch:
        raise HTTPException(413, detail=f"{len(instances)} instances exceed the limit of {max_batch} per request")
    images = []
    for i, instance in enumerate(instances):
        value = instance.get("image", instance) if isinstance(instance, dict) else None
        if isinstance(value, dict):
            value = value.get("b64")
        if not isinstance(value, str):
            raise HTTPException(400, detail=f'instance {i}: expected {{"image": {{"b64": "<base64 image>"}}}}')
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, detail=f"instance {i}: image is not valid base64") from None
        if not data:
            raise HTTPException(400, detail=f"instance {i}: image is empty")
        if len(data) > max_image_bytes:
            raise HTTPException(413, detail=f"instance {i}: image exceeds the {max_image_bytes}-byte limit")
        images.append(data)
    return images


def _rows(out: Any, expected: int, model_uri: str) -> list[dict[str, Any]]:
    """The model's DataFrame -> JSON-safe dicts (numpy scalars and arrays become plain Python)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in getattr(out, "columns", ())]
    if missing:
        raise RuntimeError(f"model output lacks columns {missing}")
    if len(out) != expected:
        raise RuntimeError(f"model returned {len(out)} rows for {expected} images")
    return [
        {
            "count": int(row["count"]),
            "confidence": float(row["confidence"]),
            "expected_count": float(row["expected_count"]),
            "probabilities": [float(p) for p in row["probabilities"]],
            "model_uri": model_uri,
        }
        for row in out[list(REQUIRED_COLUMNS)].to_dict("records")
    ]


def _truncate(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _version() -> str:
    from bincounter import __version__

    return __version__


def run(
    model_uri: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_level: str = "info",
) -> int:
    """Serve ``model_uri`` with uvicorn until SIGTERM/SIGINT; returns the exit code.

    If the model cannot be loaded the server shuts down and 1 is returned, so a container
    or ``bincounter deploy`` sees the failure instead of a process that is never ready.
    """
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(model_uri, model_name=model_name, max_body_bytes=max_body_bytes)
    # One worker: each would hold its own copy of the model.
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))

    def on_load_failure(exc: BaseException) -> None:
        server.should_exit = True

    app.state.on_load_failure = on_load_failure
    server.run()
    if app.state.model_state.status == "failed":
        log.error("exiting: model %s could not be loaded: %s", model_uri, app.state.model_state.error)
        return 1
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m bincounter.serve", description="Serve the bin counting model over HTTP.")
    parser.add_argument(
        "--model-uri", default=env.get("MODEL_URI") or DEFAULT_MODEL_URI,
        help=f"MLflow model URI (default: $MODEL_URI or {DEFAULT_MODEL_URI}).",
    )
    # No $HOST fallback: some shells set HOST to the machine's name.
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on (default: 127.0.0.1; 0.0.0.0 in containers).")
    parser.add_argument("--port", type=int, default=int(env.get("PORT", "8080")), help="Port (default: $PORT or 8080).")
    parser.add_argument("--model-name", default=env.get("MODEL_NAME"), help="Only name accepted on the KServe routes (default: any).")
    parser.add_argument(
        "--max-body-mb", type=float, default=float(env.get("BINCOUNTER_MAX_BODY_MB", DEFAULT_MAX_BODY_BYTES / 2**20)),
        help="Largest image accepted, in MiB (default: 20).",
    )
    parser.add_argument("--log-level", default=env.get("LOG_LEVEL", "info").lower(), choices=["critical", "error", "warning", "info", "debug"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: ``python -m bincounter.serve --model-uri URI [--host H] [--port P]``."""
    args = _parse_args(argv)
    return run(
        args.model_uri,
        args.host,
        args.port,
        model_name=args.model_name,
        max_body_bytes=int(args.max_body_mb * 2**20),
        log_level=args.log_level,
    )


if __name__ == "__main__":
    sys.exit(main())
