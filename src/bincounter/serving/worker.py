"""Inference for the model server: engines that turn image bytes into answers, and the
worker processes that run them.

Decoding untrusted bytes and running native inference code happen in worker processes
(``concurrent.futures.ProcessPoolExecutor`` with one process each, started with ``spawn``),
never in the process that holds the connections: if a decoder crashes on a hostile image,
one worker dies, its batch is retried image by image on a fresh worker, and the server
keeps answering.

Every engine answers a batch with one :data:`Outcome` per image, in order:
``("ok", {"count", "confidence", "expected_count", "probabilities"})`` or
``("error", http_status, message)`` for an image it refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("bincounter.serving")

Outcome = tuple  # ("ok", row) | ("error", status, message)
SPEC_FILE = "model_spec.json"
_ROW_COLUMNS = ("count", "confidence", "expected_count", "probabilities")


@dataclass(frozen=True)
class EngineSpec:
    """What a worker process needs to load the model (plain data: it crosses a process boundary)."""

    backend: str  # "onnx" | "torch" | "pyfunc"
    model_path: str  # the bincounter model folder (onnx, torch) or the MLflow model folder (pyfunc)
    onnx_path: str | None = None
    precision: str = "fp32"  # of the ONNX graph: "fp32" | "int8"
    threads: int = 1
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class ModelInfo:
    """How to read an engine's probabilities: class i is the count ``min_count + i``; a last
    class named ``"K+"`` pools every count from K up."""

    backend: str
    min_count: int = 0
    class_names: tuple[str, ...] = ()
    pid: int = field(default_factory=os.getpid)
    # Fitted with the model on held-out photos (model.calibration): the count sets' threshold and
    # coverage, and the verdict thresholds evaluation chose per rule ({} : the rules' defaults).
    count_set_threshold: float | None = None
    count_set_coverage: float | None = None
    chosen: dict = field(default_factory=dict)

    @property
    def overflow_from(self) -> int | None:
        """The smallest count of the pooled last class, if the model has one."""
        if self.class_names and self.class_names[-1].endswith("+"):
            return self.min_count + len(self.class_names) - 1
        return None


class NativeEngine:
    """A bincounter model folder (``model_spec.json``, ``model.onnx``, or ``model.pt`` for the
    torch backend): our own safe decoding, the evaluation transform, then ONNX Runtime (torch-free:
    what the serving image runs) or eager PyTorch (the full image only)."""

    def __init__(self, spec: EngineSpec):
        from bincounter.model.calibration import chosen_thresholds
        from bincounter.model.spec import ModelSpec

        folder = Path(spec.model_path)
        self.model_spec = ModelSpec.from_dict(json.loads((folder / SPEC_FILE).read_text()))
        label = f"{spec.backend}-int8" if spec.precision == "int8" else spec.backend
        self.info = ModelInfo(label, self.model_spec.min_count, tuple(self.model_spec.class_names),
                              count_set_threshold=self.model_spec.count_set_threshold,
                              count_set_coverage=self.model_spec.count_set_coverage,
                              chosen=chosen_thresholds(folder))
        load = _onnx_runtime if spec.backend == "onnx" else _torch_eager
        self._prepare, self._probabilities = load(spec, self.model_spec, folder)

    def run(self, images: list[bytes]) -> list[Outcome]:
        from bincounter.model.images import ImageRejected
        from bincounter.model.spec import describe

        outcomes: list[Outcome | None] = [None] * len(images)
        prepared, where = [], []
        for i, data in enumerate(images):
            try:
                prepared.append(self._prepare(data))
                where.append(i)
            except ImageRejected as exc:
                outcomes[i] = ("error", exc.status, str(exc))
            except Exception as exc:  # noqa: BLE001 - a transform failing on odd input is still the input's fault
                outcomes[i] = ("error", 400, f"could not decode the image ({type(exc).__name__}: {exc})")
        if prepared:
            for i, p in zip(where, self._probabilities(prepared)):
                row = describe(p, self.model_spec)
                outcomes[i] = ("ok", {k: row[k] for k in _ROW_COLUMNS})
        return outcomes  # type: ignore[return-value]


def _onnx_runtime(spec: EngineSpec, model_spec, folder: Path):
    """(prepare, probabilities) with numpy, Pillow and ONNX Runtime alone."""
    import numpy as np
    import onnxruntime as ort

    from bincounter.model.images import EvalArrays, decode_rgb

    options = ort.SessionOptions()
    options.intra_op_num_threads = spec.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(spec.onnx_path, options, providers=["CPUExecutionProvider"])
    size, takes = model_spec.image_size, session.get_inputs()[0].shape[1:]
    if takes != [3, size, size]:
        raise ValueError(f"{spec.onnx_path} takes images of shape {takes}, but "
                         f"{folder / SPEC_FILE} says {size} px: the files come from two different models")
    transform = EvalArrays(size=size, mean=model_spec.mean, std=model_spec.std)
    max_pixels = spec.max_pixels

    def prepare(data: bytes) -> np.ndarray:
        return transform(decode_rgb(data, max_pixels=max_pixels))

    def probabilities(arrays: list) -> np.ndarray:
        return session.run(None, {"image": np.stack(arrays)})[0]

    return prepare, probabilities


def _torch_eager(spec: EngineSpec, model_spec, folder: Path):
    """(prepare, probabilities) in eager PyTorch, the evaluation transform itself."""
    try:
        import torch
    except ImportError:
        raise RuntimeError("the torch backend needs PyTorch, which this image does not hold (the serving image "
                           "runs ONNX Runtime only): use --backend onnx, or the full image") from None
    from bincounter.model.networks import load_trained
    from bincounter.model.predictor import TTAProbabilities
    from bincounter.model.transforms import EvalTransform, decode_untrusted

    torch.set_num_threads(spec.threads)
    model, stored = load_trained(folder)
    if stored != model_spec:
        raise ValueError(f"{folder / SPEC_FILE} does not describe the model in model.pt ({stored}): "
                         "the files come from two different models")
    module = TTAProbabilities(model, model_spec).eval()
    transform = EvalTransform(size=model_spec.image_size, mean=model_spec.mean, std=model_spec.std)
    max_pixels = spec.max_pixels

    def prepare(data: bytes):
        return transform(decode_untrusted(data, max_pixels=max_pixels))

    def probabilities(tensors: list):
        with torch.no_grad():
            return module(torch.stack(tensors)).numpy()

    return prepare, probabilities


class PyfuncEngine:
    """Any MLflow pyfunc taking ``DataFrame({"image": [bytes]})``: the header checks run first,
    so no doubtful image reaches the model's own decoder."""

    def __init__(self, model: Any, backend: str = "pyfunc", max_pixels: int = 40_000_000):
        self.model = model
        self.max_pixels = max_pixels
        from bincounter.model.calibration import check_chosen

        meta = getattr(getattr(model, "metadata", None), "metadata", None) or {}
        threshold, coverage = meta.get("count_set_threshold"), meta.get("count_set_coverage")
        numbers = all(v is None or (isinstance(v, (int, float)) and 0 <= v <= 1) for v in (threshold, coverage))
        self.info = ModelInfo(backend, int(meta.get("min_count") or 0), tuple(meta.get("class_names") or ()),
                              count_set_threshold=threshold if numbers else None,
                              count_set_coverage=coverage if numbers else None,
                              chosen=check_chosen(meta["verdict"], "the model's metadata") if meta.get("verdict")
                              else {})

    def _predict(self, images: list[bytes]) -> list[dict]:
        import pandas as pd

        out = self.model.predict(pd.DataFrame({"image": images}))
        missing = [c for c in _ROW_COLUMNS if c not in getattr(out, "columns", ())]
        if missing:
            raise RuntimeError(f"model output lacks columns {missing}")
        if len(out) != len(images):
            raise RuntimeError(f"model returned {len(out)} rows for {len(images)} images")
        return [
            {"count": int(r["count"]), "confidence": float(r["confidence"]),
             "expected_count": float(r["expected_count"]), "probabilities": [float(p) for p in r["probabilities"]]}
            for r in out[list(_ROW_COLUMNS)].to_dict("records")
        ]

    def run(self, images: list[bytes]) -> list[Outcome]:
        from bincounter.model.images import ImageRejected, read_header

        outcomes: list[Outcome | None] = [None] * len(images)
        good = []
        for i, data in enumerate(images):
            try:
                read_header(data, max_pixels=self.max_pixels)
                good.append(i)
            except ImageRejected as exc:
                outcomes[i] = ("error", exc.status, str(exc))
        if good:
            try:
                rows = self._predict([images[i] for i in good])
            except ValueError:
                rows = None
            if rows is not None:
                for i, row in zip(good, rows):
                    outcomes[i] = ("ok", row)
            else:  # one bad image fails the model's whole call: find which, one by one
                for i in good:
                    try:
                        outcomes[i] = ("ok", self._predict([images[i]])[0])
                    except ValueError as exc:
                        outcomes[i] = ("error", 400, f"could not decode the image: {exc}")
        return outcomes  # type: ignore[return-value]


def load_engine(spec: EngineSpec) -> NativeEngine | PyfuncEngine:
    """The engine ``spec`` describes, loaded in this process."""
    if spec.backend in ("onnx", "torch"):
        return NativeEngine(spec)
    import mlflow.pyfunc

    return PyfuncEngine(mlflow.pyfunc.load_model(spec.model_path), max_pixels=spec.max_pixels)


# -- inside a worker process ----------------------------------------------------------------

_engine: NativeEngine | PyfuncEngine | None = None


def _init_worker(spec: EngineSpec) -> None:
    global _engine
    # The parent handles Ctrl-C and SIGTERM and then stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", str(spec.threads))
    _engine = load_engine(spec)
    _warm_up(_engine)


def _warm_up(engine: NativeEngine | PyfuncEngine) -> None:
    """One small image through the engine before the worker reports ready: the first call
    imports modules and allocates buffers, which would otherwise delay the first request."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buf, format="PNG")
    try:
        engine.run([buf.getvalue()])
    except Exception as exc:  # noqa: BLE001 - a model that dislikes the probe still serves real images
        log.warning("warm-up call failed (%s: %s)", type(exc).__name__, exc)


def _worker_info() -> ModelInfo:
    assert _engine is not None
    return dataclasses.replace(_engine.info, pid=os.getpid())


def _worker_run(images: list[bytes]) -> list[Outcome]:
    assert _engine is not None
    return _engine.run(images)


# -- in the server process --------------------------------------------------------------------


class WorkerProcess:
    """One supervised worker process: a single-process ``ProcessPoolExecutor``.

    ``start`` blocks until the model is loaded (call it from a thread); ``submit`` returns a
    ``concurrent.futures.Future`` that fails with ``BrokenProcessPool`` if the process dies.
    """

    def __init__(self, spec: EngineSpec, startup_timeout: float = 600.0):
        self.spec = spec
        self.startup_timeout = startup_timeout
        self.executor: ProcessPoolExecutor | None = None
        self.info: ModelInfo | None = None

    @property
    def pid(self) -> int | None:
        return self.info.pid if self.info else None

    def start(self) -> ModelInfo:
        import multiprocessing

        self.stop()
        started = time.perf_counter()
        # spawn, not fork: the server process runs threads (event loop, uvicorn), and a fork
        # of a threaded process can deadlock.
        self.executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(self.spec,))
        try:
            self.info = self.executor.submit(_worker_info).result(timeout=self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        log.info("worker %d ready (%s) in %.1f s", self.info.pid, self.info.backend, time.perf_counter() - started)
        return self.info

    def submit(self, images: list[bytes]):
        assert self.executor is not None, "worker not started"
        return self.executor.submit(_worker_run, images)

    def kill(self) -> None:
        """SIGKILL the process (a hung or crashed worker); ``start`` replaces it."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 5.0) -> None:
        """Ask the process to exit, SIGKILL it after ``grace`` seconds."""
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            deadline = time.monotonic() + grace
            while self.pid is not None and _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.kill()
            self.executor = None
        self.info = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by the executor) is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True
