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
import logging
import shutil
import sys
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from bincounter import __version__
from bincounter.config import ServeConfig
from bincounter.serving import errors, kserve, native, page, probes, sagemaker
from bincounter.serving.batching import Batcher
from bincounter.serving.counting import Counter
from bincounter.serving.loading import ModelState, load_into
from bincounter.serving.metrics import ObservabilityMiddleware, ServerMetrics

log = logging.getLogger("bincounter.serving")

DEFAULT_MODEL_URI = ServeConfig().model_uri


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
    state = ModelState(cfg.model_uri)
    metrics = ServerMetrics()
    counter = Counter(cfg, state, metrics)
    metrics.queue_depth.set_function(lambda: counter.batcher.depth if counter.batcher else 0)
    metrics.in_flight.set_function(lambda: counter.batcher.in_flight if counter.batcher else 0)
    metrics.workers_alive.set_function(lambda: state.runner.alive() if state.runner and state.ready else 0)
    app = FastAPI(title="bincounter", summary="Count the items in a warehouse bin photo.", version=__version__,
                  lifespan=lifespan(cfg, counter, model=model, loader=loader))
    app.state.model_state = state
    app.state.metrics = metrics
    errors.install(app, cfg)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, log_requests=cfg.access_log)
    for router in (page.make_router(counter.verdict_settings), probes.router(state, metrics), native.router(counter, cfg),
                   kserve.router(counter, cfg), sagemaker.router(counter)):
        app.include_router(router)
    return app


def lifespan(cfg: ServeConfig, counter: Counter, *, model: Any | None, loader: Callable[[str], Any] | None):
    """Start-up: the queue, then the model loading in a thread (in-process models at once) and the
    workers' consumers once it is loaded; shut-down: stop them and remove the downloaded model."""
    state, metrics = counter.state, counter.metrics

    def observe(batch: int, seconds: float) -> None:
        metrics.batch_size.observe(batch)
        metrics.batch_seconds.observe(seconds)

    @asynccontextmanager
    async def run(app: FastAPI):
        counter.batcher = Batcher(cfg.max_batch_size, cfg.max_wait_ms / 1000, cfg.max_queue)
        consumers: list[asyncio.Task] = []
        loaded = asyncio.Event()
        loop = asyncio.get_running_loop()

        def load_then_signal() -> None:
            try:
                load_into(state, cfg, metrics, model=model, loader=loader,
                          on_failure=getattr(app.state, "on_load_failure", None))
            finally:
                loop.call_soon_threadsafe(loaded.set)

        async def start_consumers() -> None:
            await loaded.wait()
            if state.ready:
                for i in range(state.runner.workers):
                    consumers.append(asyncio.create_task(state.runner.consume(i, counter.batcher, observe)))

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

    return run


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
