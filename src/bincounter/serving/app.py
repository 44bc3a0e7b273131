"""HTTP model server: one image in, one count out; any request at all gets a JSON answer.

One process serves three wire protocols over the same model so the same image runs
everywhere:

* the native API: ``POST /v1/count`` (raw image bytes) and ``POST /v1/count:batch``
  (multipart files), plus ``GET /healthz``, ``GET /readyz`` and ``GET /metrics``;
* KServe v1: ``GET /v1/models/{name}`` and ``POST /v1/models/{name}:predict`` with
  ``{"instances": [{"image": {"b64": "..."}}]}``;
* SageMaker hosting: ``GET /ping`` and ``POST /invocations`` (raw image bytes).

Every counting endpoint takes ``expected`` (an integer 0..1000: the count the inventory
system expects) and then also answers ``expected``, ``match`` and
``probability_of_expected``.

How a request flows: the event loop reads and checks the body (size, content type,
parameters), puts the images in the micro-batching queue (``serve_batching``), and worker
processes (``serve_worker``) decode, check and run them, so neither a slow decode nor a
crashing one can stall or kill the server. Error statuses: 400 undecodable or malformed
input, 413 body, image count or pixel count over a limit, 415 wrong content type or image
format, 422 bad parameters, 503 not ready or queue full (with ``Retry-After``).

Run it with ``python -m bincounter.serving --model-uri models:/bincounter@champion``; the
settings are :class:`bincounter.config.ServeConfig`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from bincounter.config import ServeConfig, VerdictConfig
from bincounter.serving.page import make_router
from bincounter.serving.batching import Batcher, InlineRunner, ProcessRunner, QueueFull
from bincounter.serving.metrics import ObservabilityMiddleware, ServerMetrics
from bincounter.serving.worker import SPEC_FILE, EngineSpec, ModelInfo
from bincounter.serving.verdict import probability_of, verdict

log = logging.getLogger("bincounter.serving")

DEFAULT_MODEL_URI = ServeConfig().model_uri
EXPECTED_MAX = 1000
# A multipart or JSON request carries several images; base64 inflates them by 4/3.
_MULTI_IMAGE_BODY_FACTOR = 4
_DRAIN_SECONDS = 10.0
_IMAGE_MEDIA = ("application/octet-stream", "application/x-image")
_EXPECTED_HEADER = "x-expected-count"
_SAGEMAKER_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
_EXPECTED_RE = re.compile(r"^\s*\+?(\d{1,7})\s*$", re.ASCII)

_IMAGE_BODY = {
    "required": True,
    "content": {
        media: {"schema": {"type": "string", "format": "binary"}}
        for media in ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
    },
}
_EXPECTED_QUERY = {
    "name": "expected", "in": "query", "required": False,
    "description": f"The count the inventory system expects (integer 0..{EXPECTED_MAX}); adds expected, match "
                   "and probability_of_expected to the answer.",
    "schema": {"type": "integer", "minimum": 0, "maximum": EXPECTED_MAX},
}


class CountResult(BaseModel):
    """One image's prediction, as every endpoint returns it."""

    count: int
    confidence: float
    expected_count: float
    probabilities: list[float]
    model_uri: str
    expected: int | None = None
    match: bool | None = None
    probability_of_expected: float | None = None
    verdict: str | None = None


class KServeResponse(BaseModel):
    predictions: list[CountResult]


class _State:
    """What the endpoints need to know about the model, shared with the loader thread."""

    def __init__(self, model_uri: str):
        self.model_uri = model_uri
        self.status = "not_loaded"
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.version = ""
        self.runner: InlineRunner | ProcessRunner | None = None
        self.info: ModelInfo | None = None
        self.workdir: str | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"


# -- loading ----------------------------------------------------------------------------------


def _configure_tracking(model_uri: str) -> None:
    """``models:/`` and ``runs:/`` need a tracking server; without ``$MLFLOW_TRACKING_URI`` the
    project's local SQLite store is used, so a server started next to ``bincounter register``
    finds the model it registered."""
    import mlflow

    from bincounter.serving.credentials import export_mlflow_credentials

    export_mlflow_credentials()  # a SageMaker endpoint's credentials, from Secrets Manager
    if model_uri.startswith(("models:/", "runs:/")) and not os.environ.get("MLFLOW_TRACKING_URI"):
        from bincounter import paths

        mlflow.set_tracking_uri(paths.default_tracking_uri())


def load_model(model_uri: str) -> Any:
    """Load an MLflow pyfunc model in this process (notebooks, ``loader=``)."""
    import mlflow.pyfunc

    _configure_tracking(model_uri)
    return mlflow.pyfunc.load_model(model_uri)


def model_version(model_uri: str) -> str:
    """The registry version a ``models:/`` URI points at now ('' for other URIs)."""
    match = re.match(r"^models:/([^/@]+)(?:@(.+)|/(\d+))$", model_uri)
    if not match:
        return ""
    if match.group(3):
        return match.group(3)
    from mlflow import MlflowClient

    try:
        return str(MlflowClient().get_model_version_by_alias(match.group(1), match.group(2)).version)
    except Exception:  # noqa: BLE001 - the version is a label; serving works without it
        return ""


def _native_folder(model_path: Path) -> Path | None:
    """The bincounter model folder (model_spec.json, model.pt...) inside an MLflow model, if any."""
    if (model_path / SPEC_FILE).is_file():
        return model_path
    mlmodel = model_path / "MLmodel"
    if not mlmodel.is_file():
        return None
    import yaml

    meta = yaml.safe_load(mlmodel.read_text()) or {}
    artifact = (meta.get("flavors", {}).get("python_function", {}).get("artifacts", {}) or {}).get("model_dir")
    if isinstance(artifact, dict) and artifact.get("path"):
        folder = model_path / artifact["path"]
        if (folder / SPEC_FILE).is_file():
            return folder
    return None


def engine_spec(cfg: ServeConfig, model_path: Path, workdir: Path) -> EngineSpec:
    """Pick the engine for a downloaded model: ONNX Runtime when it is a bincounter model
    (exporting ``model.onnx`` if it was registered without one), else its pyfunc."""
    native = _native_folder(model_path)
    backend = cfg.backend
    if backend == "auto":
        backend = "onnx" if native is not None else "pyfunc"
    common = {"threads": cfg.threads_per_worker, "max_pixels": cfg.max_pixels}
    if backend == "pyfunc":
        return EngineSpec("pyfunc", str(model_path), **common)
    if native is None:
        raise ValueError(f"backend {backend!r} needs a bincounter model ({SPEC_FILE}); {model_path} has none")
    if backend == "torch":
        return EngineSpec("torch", str(native), **common)
    from bincounter.model.onnx_export import ONNX_FILE, export_onnx

    onnx = native / ONNX_FILE
    if not onnx.is_file():
        log.info("the model has no %s (registered before ONNX export); exporting it now", ONNX_FILE)
        onnx = export_onnx(native, workdir / ONNX_FILE)
    return EngineSpec("onnx", str(native), onnx_path=str(onnx), **common)


def _download(model_uri: str, workdir: Path) -> Path:
    if Path(model_uri).is_dir():
        return Path(model_uri)
    import mlflow

    _configure_tracking(model_uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(workdir / "model")))


# -- request parsing ----------------------------------------------------------------------------


def parse_expected(value: Any, where: str = "expected") -> int | None:
    """``expected`` from a query string, header or JSON value: an integer 0..1000, else 422."""
    if value is None:
        return None
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, str):
        match = _EXPECTED_RE.match(value)
        number = int(match.group(1)) if match else None
    if number is None or not 0 <= number <= EXPECTED_MAX:
        shown = value if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise HTTPException(422, detail=f"{where} must be an integer from 0 to {EXPECTED_MAX}, got {shown!r}")
    return number


def _query_expected(request: Request) -> int | None:
    values = request.query_params.getlist("expected")
    if len(values) > 1:
        raise HTTPException(422, detail="expected is given more than once")
    return parse_expected(values[0], "expected") if values else None


def _sagemaker_expected(request: Request) -> int | None:
    """``expected`` from ``?expected=``, ``X-Expected-Count`` or SageMaker's custom attributes
    (``X-Amzn-SageMaker-Custom-Attributes: expected=3``); they must agree."""
    found: dict[str, int] = {}
    query = _query_expected(request)
    if query is not None:
        found["query"] = query
    header = request.headers.get(_EXPECTED_HEADER)
    if header is not None:
        found[_EXPECTED_HEADER] = parse_expected(header, "X-Expected-Count")  # type: ignore[assignment]
    for part in re.split(r"[;,]", request.headers.get(_SAGEMAKER_ATTRIBUTES, "")):
        key, _, value = part.partition("=")
        if key.strip().lower() == "expected":
            found["custom attributes"] = parse_expected(value, "expected in X-Amzn-SageMaker-Custom-Attributes")  # type: ignore[assignment]
    if len(set(found.values())) > 1:
        raise HTTPException(422, detail=f"expected is given differently in {', '.join(found)}")
    return next(iter(found.values()), None)


def _check_image_type(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media and not media.startswith("image/") and media not in _IMAGE_MEDIA:
        raise HTTPException(415, detail=f"content type {media[:100]!r} is not an image: send the image bytes with "
                                        "Content-Type: image/jpeg (or image/png, application/octet-stream)")


def _check_type(request: Request, wanted: str, hint: str) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != wanted:
        raise HTTPException(415, detail=f"content type {media[:100]!r} is not {wanted}: {hint}")


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) anything over ``limit`` bytes, declared or sent."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise HTTPException(400, detail="invalid Content-Length header")
        if int(declared) > limit:
            raise HTTPException(413, detail=f"body of {int(declared)} bytes exceeds the {limit}-byte limit")
    body = bytearray()
    # Chunked uploads have no Content-Length, so count as we go.
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, detail=f"body exceeds the {limit}-byte limit")
    return bytes(body)


def _decode_instances(payload: Any, max_images: int, max_image_bytes: int,
                      default_expected: int | None) -> tuple[list[bytes], list[int | None]]:
    """KServe v1 instances -> image bytes and expected counts; accepts
    ``{"image": {"b64": s}, "expected": n}``, ``{"image": s}`` and ``{"b64": s}``."""
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        raise HTTPException(400, detail='expected {"instances": [{"image": {"b64": "..."}}, ...]}')
    instances = payload["instances"]
    if not instances:
        raise HTTPException(400, detail="instances is empty")
    if len(instances) > max_images:
        raise HTTPException(413, detail=f"{len(instances)} instances exceed the limit of {max_images} per request")
    images, expected = [], []
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
        own = parse_expected(instance.get("expected"), f"instance {i}: expected") if isinstance(instance, dict) else None
        if own is not None and default_expected is not None and own != default_expected:
            raise HTTPException(422, detail=f"instance {i}: expected {own} disagrees with ?expected={default_expected}")
        expected.append(own if own is not None else default_expected)
    return images, expected


def inventory_check(row: dict, expected: int, info: ModelInfo, rule: VerdictConfig = VerdictConfig()) -> dict:
    """``expected``, ``match``, ``probability_of_expected`` and ``verdict`` for one answer.

    Class i of the model is the count ``min_count + i``; a pooled last class ("K+") stands
    for every count from K up, so for those its probability is P(count >= K), an upper bound.
    A count the model has no class for gets probability null and verdict "unsure".
    """
    overflow = info.overflow_from
    probability = probability_of(expected, row["probabilities"], info.min_count, open_ended=overflow is not None)
    match = row["count"] == expected or (overflow is not None and expected >= overflow and row["count"] == overflow)
    return {"expected": expected, "match": bool(match), "probability_of_expected": probability,
            "verdict": verdict(probability, rule)}


# -- the app ------------------------------------------------------------------------------------


def create_app(cfg: ServeConfig | None = None, *, model: Any | None = None,
               loader: Callable[[str], Any] | None = None) -> FastAPI:
    """Build the FastAPI app for ``cfg`` (default: ``ServeConfig()``).

    Args:
        cfg: the server's settings (model URI, limits, batching, workers).
        model: an already loaded model with ``predict(DataFrame({"image": [bytes]}))``
            (tests, notebooks); runs in a thread of this process, no worker processes.
        loader: returns such a model for ``cfg.model_uri`` (tests); same in-process mode.

    Without either, the model is downloaded and loaded in ``cfg.workers`` worker processes
    by a background thread started by the lifespan handler, so ``/healthz`` answers during a
    long download while ``/readyz`` says 503.
    """
    cfg = cfg or ServeConfig()
    model_uri = cfg.model_uri
    state = _State(model_uri)
    metrics = ServerMetrics()
    multi_body_bytes = cfg.max_body_bytes * _MULTI_IMAGE_BODY_FACTOR
    batcher_box: list[Batcher] = []
    metrics.queue_depth.set_function(lambda: batcher_box[0].depth if batcher_box else 0)
    metrics.workers_alive.set_function(lambda: state.runner.alive() if state.runner and state.ready else 0)

    def _load(app: FastAPI) -> None:
        state.status = "loading"
        started = time.perf_counter()
        log.info("loading model %s", model_uri)
        try:
            if model is not None or loader is not None:
                runner = InlineRunner(model if model is not None else loader(model_uri), cfg.max_pixels)
            else:
                state.workdir = tempfile.mkdtemp(prefix="bincounter-serve-")
                workdir = Path(state.workdir)
                spec = engine_spec(cfg, _download(model_uri, workdir), workdir)
                state.version = model_version(model_uri)
                runner = ProcessRunner(spec, cfg.workers, cfg.worker_timeout_s,
                                       on_restart=metrics.worker_restarts.inc)
            state.runner = runner
            state.info = runner.start()
        except BaseException as exc:  # noqa: BLE001 - any failure must reach /readyz and the log
            state.error = f"{type(exc).__name__}: {exc}"
            state.status = "failed"
            log.exception("could not load model %s", model_uri)
            on_failure = getattr(app.state, "on_load_failure", None)
            if on_failure is not None:
                on_failure(exc)
            return
        state.load_seconds = time.perf_counter() - started
        metrics.model_info.labels(model_uri, state.version, state.info.backend).set(1)
        state.status = "ready"
        log.info("model %s (version %s, %s) ready in %.1f s", model_uri, state.version or "-", state.info.backend,
                 state.load_seconds)

    def _observe(batch: int, seconds: float) -> None:
        metrics.batch_size.observe(batch)
        metrics.batch_seconds.observe(seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher_box.append(Batcher(cfg.max_batch_size, cfg.max_wait_ms / 1000, cfg.max_queue))
        consumers: list[asyncio.Task] = []
        loaded = asyncio.Event()
        loop = asyncio.get_running_loop()

        def load_then_signal() -> None:
            try:
                _load(app)
            finally:
                loop.call_soon_threadsafe(loaded.set)

        async def start_consumers() -> None:
            await loaded.wait()
            if state.ready:
                for i in range(state.runner.workers):
                    consumers.append(asyncio.create_task(state.runner.consume(i, batcher_box[0], _observe)))

        if model is not None:  # already in memory: ready before the first request
            load_then_signal()
        else:
            threading.Thread(target=load_then_signal, name="model-loader", daemon=True).start()
        starter = asyncio.create_task(start_consumers())
        try:
            yield
        finally:
            starter.cancel()
            for task in consumers:
                task.cancel()
            if state.runner is not None:
                state.runner.stop()
            if state.workdir:
                shutil.rmtree(state.workdir, ignore_errors=True)

    app = FastAPI(title="bincounter", summary="Count the items in a warehouse bin photo.", version=_version(),
                  lifespan=lifespan)
    app.state.model_state = state
    app.state.metrics = metrics
    app.include_router(make_router(cfg.verdict))  # GET /: the one-bin page
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, log_requests=cfg.access_log)

    # -- errors: always JSON, and the body is drained first so the client reads the answer ------

    async def _drain(request: Request) -> None:
        scope_state = request.scope.get("state", {})
        if scope_state.get("body_complete", True) or request.method in ("GET", "HEAD", "OPTIONS"):
            return
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > cfg.max_drain_bytes:
            return  # too much to read for nothing: the connection closes after the answer
        drained = 0
        try:
            with anyio.move_on_after(_DRAIN_SECONDS):
                while not scope_state.get("body_complete", True) and drained <= cfg.max_drain_bytes:
                    message = await request.receive()
                    drained += len(message.get("body", b""))
        except (OSError, RuntimeError):
            pass

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        await _drain(request)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        await _drain(request)
        return JSONResponse({"detail": jsonable(exc.errors())}, status_code=422)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody reads this answer; it keeps a vanished client out of the 5xx counts.
        return JSONResponse({"detail": "client disconnected before sending the whole body"}, status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    # -- counting --------------------------------------------------------------------------

    def _require_ready() -> None:
        if not state.ready:
            detail = f"model {model_uri} is not loaded ({state.status})"
            if state.error:
                detail += f": {state.error}"
            raise HTTPException(503, detail=detail, headers={"Retry-After": "5"})

    async def _count(images: list[bytes], expected: list[int | None], labels: list[str] | None = None) -> list[dict]:
        _require_ready()
        started = time.perf_counter()
        try:
            outcomes = await batcher_box[0].submit(images)
        except QueueFull as exc:
            metrics.rejected.inc()
            raise HTTPException(503, detail=f"server busy: {exc}; retry shortly", headers={"Retry-After": "1"}) from None
        waited = time.perf_counter() - started
        answers = []
        for i, outcome in enumerate(outcomes):
            metrics.images.labels("200" if outcome[0] == "ok" else str(outcome[1])).inc()
            metrics.queue_wait.observe(waited)
            if outcome[0] != "ok":
                where = f" ({labels[i] if labels else f'instance {i}'})" if len(images) > 1 else ""
                raise HTTPException(outcome[1], detail=f"{_truncate(outcome[2])}{where}")
            row = outcome[1]
            metrics.predicted_count.observe(row["count"])
            answer = {**row, "model_uri": model_uri}
            if expected[i] is not None:
                answer.update(inventory_check(row, expected[i], state.info, cfg.verdict))
            answers.append(answer)
        return answers

    async def _count_raw(request: Request, expected: int | None) -> dict:
        _check_image_type(request)
        body = await _read_body(request, cfg.max_body_bytes)
        if not body:
            raise HTTPException(400, detail="empty body: send the image bytes (JPEG or PNG) as the request body")
        return (await _count([body], [expected]))[0]

    # -- probes ----------------------------------------------------------------------------

    @app.get("/healthz", tags=["probes"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    def _readiness() -> JSONResponse:
        body: dict[str, Any] = {"status": state.status, "model_uri": model_uri, "pid": os.getpid()}
        if state.version:
            body["version"] = state.version
        if state.info is not None:
            body["backend"] = state.info.backend
        if isinstance(state.runner, ProcessRunner) and state.ready:
            body["worker_pids"] = [w.pid for w in state.runner.processes if w.pid is not None]
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/readyz", tags=["probes"])
    def readyz() -> JSONResponse:
        """Readiness: 200 once the model is loaded, 503 before (or if loading failed)."""
        return _readiness()

    @app.get("/metrics", tags=["probes"])
    def prometheus_metrics() -> Response:
        """Prometheus metrics (text exposition format)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- native API ------------------------------------------------------------------------

    @app.post("/v1/count", response_model=CountResult, response_model_exclude_unset=True, tags=["count"],
              openapi_extra={"requestBody": _IMAGE_BODY, "parameters": [_EXPECTED_QUERY]})
    async def count(request: Request) -> dict[str, Any]:
        """Count the items in one image sent as the raw request body."""
        return await _count_raw(request, _query_expected(request))

    @app.post(
        "/v1/count:batch", response_model=list[CountResult], response_model_exclude_unset=True, tags=["count"],
        openapi_extra={
            "parameters": [_EXPECTED_QUERY],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "expected": {"type": "array", "items": {"type": "integer"},
                                 "description": "One value for every file, or one per file in order."},
                },
            }}}},
        },
    )
    async def count_batch(request: Request) -> list[dict[str, Any]]:
        """Count several images sent as multipart files (any field name), in order."""
        _check_type(request, "multipart/form-data", "send the images as multipart/form-data files")
        query_expected = _query_expected(request)
        body = await _read_body(request, multi_body_bytes)

        # The body is already read (to enforce the limit); replay it to the form parser.
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=cfg.max_images, max_fields=cfg.max_images * 2 + 8, max_part_size=cfg.max_body_bytes
            )
        except AssertionError as exc:  # starlette's way of saying python-multipart is missing
            raise HTTPException(501, detail=f"batch uploads are unavailable: {exc}") from None
        except StarletteHTTPException as exc:
            if "Too many files" in str(exc.detail):
                raise HTTPException(413, detail=f"more than {cfg.max_images} files in one request") from None
            raise HTTPException(400, detail=f"malformed multipart body: {exc.detail}") from None
        except Exception as exc:  # noqa: BLE001 - malformed bodies raise parser-specific errors
            raise HTTPException(400, detail=f"malformed multipart body: {type(exc).__name__}") from None
        images: list[bytes] = []
        labels: list[str] = []
        form_expected: list[int] = []
        try:
            for key, value in form.multi_items():
                if isinstance(value, str):
                    if key == "expected":
                        form_expected.append(parse_expected(value, "form field expected"))  # type: ignore[arg-type]
                    continue
                data = await value.read()
                label = f"file {(value.filename or key)[:100]!r}"
                if len(data) > cfg.max_body_bytes:
                    raise HTTPException(413, detail=f"{label} exceeds the {cfg.max_body_bytes}-byte limit")
                if not data:
                    raise HTTPException(400, detail=f"{label} is empty")
                images.append(data)
                labels.append(label)
        finally:
            await form.close()
        if not images:
            raise HTTPException(400, detail="no image files in the multipart body (send them as file parts)")
        if form_expected and query_expected is not None:
            raise HTTPException(422, detail="give expected either in the query or in the form, not both")
        if len(form_expected) == 1:
            expected: list[int | None] = form_expected * len(images)
        elif form_expected:
            if len(form_expected) != len(images):
                raise HTTPException(422, detail=f"{len(form_expected)} expected values for {len(images)} files: "
                                                "give one for all or one per file")
            expected = list(form_expected)
        else:
            expected = [query_expected] * len(images)
        return await _count(images, expected, labels)

    # -- KServe v1 -------------------------------------------------------------------------

    def _check_name(name: str) -> None:
        if cfg.model_name is not None and name != cfg.model_name:
            raise HTTPException(404, detail=f"model {name[:100]!r} does not exist (this server serves {cfg.model_name!r})")

    @app.get("/v1/models", tags=["kserve"])
    def kserve_list() -> dict[str, list[str]]:
        """KServe v1: the served model names."""
        return {"models": [cfg.model_name or "bincounter"]}

    @app.post("/v1/models/{name}:predict", response_model=KServeResponse, response_model_exclude_unset=True,
              tags=["kserve"], openapi_extra={"parameters": [_EXPECTED_QUERY]})
    async def kserve_predict(name: str, request: Request) -> dict[str, Any]:
        """KServe v1 predict: ``{"instances": [{"image": {"b64": "..."}, "expected": 3}]}``."""
        _check_name(name)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media and media != "application/json":
            raise HTTPException(415, detail=f"content type {media[:100]!r} is not application/json")
        query_expected = _query_expected(request)
        raw = await _read_body(request, multi_body_bytes)

        def parse() -> tuple[list[bytes], list[int | None]]:
            try:
                payload = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise HTTPException(400, detail=f"body is not valid JSON: {exc}") from None
            except RecursionError:
                raise HTTPException(400, detail="body is not valid JSON: nested too deeply") from None
            return _decode_instances(payload, cfg.max_images, cfg.max_body_bytes, query_expected)

        # Parsing megabytes of JSON and base64 would stall every other request: a thread does it.
        images, expected = await anyio.to_thread.run_sync(parse)
        return {"predictions": await _count(images, expected)}

    @app.get("/v1/models/{name}", tags=["kserve"])
    def kserve_ready(name: str) -> JSONResponse:
        """KServe v1 model readiness: 200 when loaded, else 503."""
        _check_name(name)
        return JSONResponse({"name": name, "ready": state.ready}, status_code=200 if state.ready else 503)

    # -- SageMaker hosting -------------------------------------------------------------------

    @app.get("/ping", tags=["sagemaker"])
    def ping() -> JSONResponse:
        """SageMaker health check: 200 when the model is loaded."""
        return _readiness()

    @app.post("/invocations", response_model=CountResult, response_model_exclude_unset=True, tags=["sagemaker"],
              openapi_extra={"requestBody": _IMAGE_BODY, "parameters": [_EXPECTED_QUERY]})
    async def invocations(request: Request) -> dict[str, Any]:
        """SageMaker inference: raw image bytes in, the same JSON as ``/v1/count`` out; ``expected``
        as ``?expected=``, ``X-Expected-Count`` or ``X-Amzn-SageMaker-Custom-Attributes: expected=N``."""
        return await _count_raw(request, _sagemaker_expected(request))

    return app


def jsonable(errors: Any) -> Any:
    """FastAPI's validation errors with anything that is not JSON made a string."""
    return json.loads(json.dumps(errors, default=str))


def _truncate(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _version() -> str:
    from bincounter import __version__

    return __version__


# -- running ------------------------------------------------------------------------------------


def configure_logging(level: str) -> None:
    """JSON lines on stderr for the server's own log and the access log."""
    from bincounter.serving.metrics import JsonFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def run(cfg: ServeConfig) -> int:
    """Serve ``cfg.model_uri`` with uvicorn until SIGTERM/SIGINT; returns the exit code.

    If the model cannot be loaded the server shuts down and 1 is returned, so a container
    or ``bincounter deploy`` sees the failure instead of a process that is never ready.
    """
    import uvicorn

    configure_logging(cfg.log_level)
    app = create_app(cfg)
    # One uvicorn process: the worker processes hold the model; more would multiply them.
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                           lifespan="on", access_log=False, log_config=None))

    def on_load_failure(exc: BaseException) -> None:
        server.should_exit = True

    app.state.on_load_failure = on_load_failure
    server.run()
    if app.state.model_state.status == "failed":
        log.error("exiting: model %s could not be loaded: %s", cfg.model_uri, app.state.model_state.error)
        return 1
    return 0


def parse_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServeConfig:
    """Settings from the command line over the environment (:meth:`ServeConfig.from_env`)."""
    import tyro

    return tyro.cli(ServeConfig, default=ServeConfig.from_env(environ), args=argv,
                    prog="python -m bincounter.serving", description="Serve the bin counting model over HTTP.")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: ``python -m bincounter.serving --model-uri URI [--host H] [--port P] ...``."""
    return run(parse_config(argv))


if __name__ == "__main__":
    sys.exit(main())
