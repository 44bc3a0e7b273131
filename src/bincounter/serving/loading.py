"""Getting the model the server runs: download it (MLflow URI or a local folder), pick its engine
(ONNX Runtime for a bincounter model, exporting the ONNX graph if it was registered without one,
else its pyfunc), and the state the endpoints read while it loads."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from bincounter.config import ServeConfig
from bincounter.serving.batching import InlineRunner, ProcessRunner
from bincounter.serving.worker import SPEC_FILE, EngineSpec, ModelInfo

log = logging.getLogger("bincounter.serving")


class ModelState:
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
        """Loaded, and at least one worker runs to answer."""
        return self.status == "ready" and (self.runner is None or self.runner.alive() > 0)

    @property
    def problem(self) -> str | None:
        """Why the server cannot answer now: a failed load, or no worker running."""
        return self.error or (getattr(self.runner, "last_error", None) if self.status == "ready" else None)


def configure_tracking(model_uri: str) -> None:
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

    configure_tracking(model_uri)
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


def native_folder(model_path: Path) -> Path | None:
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


def has_torch() -> bool:
    """Whether PyTorch can be imported here (the serving image has none: ONNX Runtime only)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


ONNX_ONLY = ("this image serves ONNX models only (it holds no PyTorch); bincounter register logs model.onnx "
             "with every model: register it again, or serve it with the full image (ghcr.io/bincounter/bincounter)")


def engine_spec(cfg: ServeConfig, model_path: Path, workdir: Path) -> EngineSpec:
    """Pick the engine for a downloaded model: ONNX Runtime when it is a bincounter model
    (exporting ``model.onnx`` if it was registered without one and torch is here), else its pyfunc."""
    from bincounter.model.spec import INT8_ONNX_FILE, ONNX_FILE

    native = native_folder(model_path)
    backend = cfg.backend
    if backend == "auto":
        backend = "onnx" if native is not None else "pyfunc"
    common = {"threads": cfg.threads_per_worker, "max_pixels": cfg.max_pixels}
    if backend in ("pyfunc", "torch") and not has_torch():
        what = "a model that is no bincounter model" if native is None else f"the {backend} backend"
        raise ValueError(f"{model_path}: cannot serve {what}: {ONNX_ONLY}")
    if backend == "pyfunc":
        return EngineSpec("pyfunc", str(model_path), **common)
    if native is None:
        raise ValueError(f"backend {backend!r} needs a bincounter model ({SPEC_FILE}); {model_path} has none")
    if backend == "torch":
        return EngineSpec("torch", str(native), **common)
    int8 = native / INT8_ONNX_FILE
    if cfg.precision == "int8" and not int8.is_file():
        raise ValueError(f"precision 'int8' asked for, but {model_path} has no {INT8_ONNX_FILE} (evaluation keeps it "
                         "only when it answers within its accuracy bound of fp32): serve with --precision fp32 or auto")
    if cfg.precision != "fp32" and int8.is_file():
        return EngineSpec("onnx", str(native), onnx_path=str(int8), precision="int8", **common)
    onnx = native / ONNX_FILE
    if not onnx.is_file():
        if not has_torch():
            raise ValueError(f"{model_path} has no {ONNX_FILE} (registered before ONNX export): {ONNX_ONLY}")
        from bincounter.model.onnx_export import export_onnx

        log.info("the model has no %s (registered before ONNX export); exporting it now", ONNX_FILE)
        onnx = export_onnx(native, workdir / ONNX_FILE)
    return EngineSpec("onnx", str(native), onnx_path=str(onnx), **common)


def download(model_uri: str, workdir: Path) -> Path:
    if Path(model_uri).is_dir():
        return Path(model_uri)
    import mlflow

    configure_tracking(model_uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(workdir / "model")))


def load_into(state: ModelState, cfg: ServeConfig, metrics, *, model: Any | None = None,
              loader=None, on_failure=None) -> None:
    """Load ``state.model_uri`` and start its runner: ``model`` (or ``loader``'s) in this process,
    else downloaded and served by ``cfg.workers`` worker processes. Any failure lands in
    ``state`` (``/readyz`` shows it) and is handed to ``on_failure``; nothing is raised."""
    import tempfile
    import time

    state.status = "loading"
    started = time.perf_counter()
    log.info("loading model %s", state.model_uri)
    try:
        if model is not None or loader is not None:
            runner = InlineRunner(model if model is not None else loader(state.model_uri), cfg.max_pixels)
            state.version = model_version(state.model_uri)
        else:
            state.workdir = tempfile.mkdtemp(prefix="bincounter-serve-")
            workdir = Path(state.workdir)
            spec = engine_spec(cfg, download(state.model_uri, workdir), workdir)
            state.version = model_version(state.model_uri)
            runner = ProcessRunner(spec, cfg.workers, cfg.worker_timeout_s, on_restart=metrics.worker_restarts.inc)
        state.runner = runner
        state.info = runner.start()
        cfg.verdict.thresholds(state.info.chosen)  # the server's thresholds and the model's must make one band
    except BaseException as exc:  # noqa: BLE001 - any failure must reach /readyz and the log
        state.error = f"{type(exc).__name__}: {exc}"
        state.status = "failed"
        log.exception("could not load model %s", state.model_uri)
        if on_failure is not None:
            on_failure(exc)
        return
    state.load_seconds = time.perf_counter() - started
    metrics.model_info.labels(state.model_uri, state.version, state.info.backend).set(1)
    state.status = "ready"
    log.info("model %s (version %s, %s) ready in %.1f s", state.model_uri, state.version or "-", state.info.backend,
             state.load_seconds)
