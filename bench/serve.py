"""Serving speed: photos/s and latency of ``bincounter.serving`` vs ``mlflow models serve``.

Both serve the same registered model: EfficientNet-Lite0 at 224 px with 4-flip test-time
augmentation (ImageNet weights from the offline package, untrained head: speed does not
depend on the head's training), registered with ``bincounter.registry.register`` in a throw-away
MLflow store. Both get the same real photos (../shared/abid-dev/bin-images, a fixed sample;
synthetic photos when that folder is absent), one photo per request, from N client threads
with keep-alive connections, at concurrency 1 and 8, for a fixed time after a warm-up.
Ours: default settings (ONNX Runtime in worker processes, micro-batching); the request is
the raw JPEG on ``/v1/count``. Baseline: ``mlflow models serve --env-manager local`` with
its defaults; the request is MLflow's JSON (``dataframe_split``, the image base64-encoded),
which its pyfunc decodes with eager PyTorch. One server runs at a time.

The raw limit is the same exported model (views included) run straight in ONNX Runtime
on already-decoded, already-resized photos, 8 photos (32 views) per call, with every core:
no HTTP, no decoding: the best of one session on every core (spinning threads on, off) and
one single-threaded session's rate times the number of cores. Eager PyTorch on the same input is printed beside it (how the
inference path was chosen).

With ``$BENCH_SERVE_IMAGE`` set to the serving image (``make image-serve``: no torch), ours runs
in that image instead (docker, else buildah, host network), on the registered model's files
mounted read-only; the baseline and the raw limits stay in this venv.

Run: ``.venv/bin/python bench/serve.py`` (from a git worktree, point
``$BINCOUNTER_SHARED_DATA`` at the abid-dev folder); the last line is ``ratio: X.XX (goal >= 2.0)``
(our photos/s over mlflow's at concurrency 8).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

# ../shared/abid-dev beside the checkout; $BINCOUNTER_SHARED_DATA points elsewhere (a git worktree).
SHARED = Path(os.environ.get("BINCOUNTER_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "abid-dev")
N_PHOTOS = 200
SECONDS = float(os.environ.get("BENCH_SERVE_SECONDS", "20"))
WARMUP = 16
CONCURRENCY = (1, 8)
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def photos(work: Path) -> tuple[list[bytes], str]:
    folder = SHARED / "bin-images"
    if folder.is_dir():
        files = sorted(folder.glob("*.jpg"))
        sample = random.Random(0).sample(files, min(N_PHOTOS, len(files)))
        return [p.read_bytes() for p in sample], f"{len(sample)} real photos from {folder}"
    from bincounter_demo.synth import SynthConfig, generate

    generate(SynthConfig(n_images=N_PHOTOS, image_size=224, seed=0), work / "synth")
    files = sorted((work / "synth" / "bin-images").glob("*.jpg"))
    return [p.read_bytes() for p in files], f"{len(files)} synthetic 224 px photos ({SHARED} not found)"


def register_model(work: Path) -> str:
    """EfficientNet-Lite0, 6 classes, 224 px, 4-flip TTA, registered as bench-serve@champion."""
    from bincounter.config import RegisterConfig
    from bincounter.model.networks import ModelSpec, build_model, normalization_for, save_model_folder
    from bincounter.registry.register import Verdict, register

    mean, std = normalization_for("efficientnet_lite0")
    spec = ModelSpec(backbone="efficientnet_lite0", num_classes=6, image_size=224, mean=mean, std=std,
                     class_names=tuple("012345"), tta=True)
    model_dir = save_model_folder(build_model(spec, pretrained="auto").eval(), spec, work / "model")
    # A store of its own, one model: nothing to gate it against.
    register(RegisterConfig(model_name="bench-serve"), model_dir, {"accuracy": 0.0},
             judge=lambda champion: Verdict(True, "bench: the only model"))
    return "models:/bench-serve@champion"


def ours_command(model_uri: str, port: int, work: Path) -> tuple[list[str], str | None]:
    """How to start our server: in this venv, or in $BENCH_SERVE_IMAGE on the model's files.
    Returns the command and the buildah container to remove afterwards (None otherwise)."""
    args = ["--port", str(port), "--no-access-log"]
    image = os.environ.get("BENCH_SERVE_IMAGE")
    if not image:
        return [sys.executable, "-m", "bincounter.serving", "--model-uri", model_uri, *args], None
    import mlflow

    (work / "served").mkdir(parents=True)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(work / "served")))
    folder = next(folder.rglob("model_spec.json")).parent
    for path in [work.parent, work, *work.rglob("*")]:  # the image's user (uid 10001) reads the mount
        path.chmod(0o755 if path.is_dir() else 0o644)
    inner = ["python", "-m", "bincounter.serving", "--model-uri", "/model", "--host", "127.0.0.1", *args]
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0 if shutil.which("docker") else False:
        return ["docker", "run", "--rm", "--network", "host", "-v", f"{folder}:/model:ro", image, *inner], None
    ctr = subprocess.run(["buildah", "from", "--pull=never", "--quiet", image], capture_output=True, text=True,
                         check=True).stdout.strip()
    return ["buildah", "run", "--isolation", "chroot", "--network", "host", "-v", f"{folder}:/model:ro", ctr, "--",
            *inner], ctr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, ready_path: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited:\n{log.read_text()[-3000:]}")
        try:
            with _opener.open(f"http://127.0.0.1:{port}{ready_path}", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{cmd[:4]} not ready:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def load(port: int, requests: list[tuple[str, bytes, dict]], concurrency: int, seconds: float) -> dict:
    """Closed-loop clients: each sends its next request when the previous is answered."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_at = time.perf_counter() + 0.0
    stop_at = start_at + seconds

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        i = k
        while time.perf_counter() < stop_at:
            path, body, headers = requests[i % len(requests)]
            i += concurrency
            t = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except (OSError, http.client.HTTPException) as exc:
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                r = exc
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors.append(str(getattr(r, "status", r)))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    lat = np.array(latencies) * 1000
    return {"photos_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "n": len(latencies), "errors": len(errors)}


def measure(name: str, port: int, requests: list, results: dict) -> None:
    load(port, requests[:WARMUP], 2, 5.0)  # warm-up: lazy initialisation, caches
    for c in CONCURRENCY:
        r = load(port, requests, c, SECONDS)
        results[(name, c)] = r
        print(f"{name:>7} concurrency {c}: {r['photos_per_s']:6.1f} photos/s  p50 {r['p50_ms']:7.1f} ms  "
              f"p99 {r['p99_ms']:7.1f} ms  ({r['n']} answers, {r['errors']} errors)", flush=True)


def raw_limits(model_uri: str, images: list[bytes], seconds: float = 10.0) -> dict[str, float]:
    """Photos/s straight in ONNX Runtime and eager PyTorch, 8 photos (32 views) per call, all cores."""
    import mlflow
    import onnxruntime as ort
    import torch

    from bincounter.model.networks import load_trained
    from bincounter.model.predictor import Predictor, TTAProbabilities

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    folder = next(local.rglob("model_spec.json")).parent
    model, spec = load_trained(folder)
    predictor = Predictor(model, spec)
    x = predictor.prepare(images[:8])
    out = {}
    rates = []
    # Spinning threads help on an idle machine and hurt on a shared one: the better of the two counts.
    for spinning in ("1", "0"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        rates.append(_rate(lambda: session.run(None, {"image": x.numpy()}), 8, seconds / 2))
    # One thread on one core, scaled by the cores: the limit if threads scaled perfectly (an
    # oversubscribed machine punishes one multi-threaded session more than single-threaded workers).
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    rates.append((os.cpu_count() or 1) * _rate(lambda: session.run(None, {"image": x.numpy()}), 8, seconds / 2))
    out["onnxruntime"] = max(rates)
    torch.set_num_threads(os.cpu_count() or 1)
    module = TTAProbabilities(model, spec).eval()
    with torch.no_grad():
        out["torch eager"] = _rate(lambda: module(x), 8, seconds)
    return out


def _rate(fn, photos_per_call: int, seconds: float) -> float:
    fn()
    n, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        fn()
        n += photos_per_call
    return n / (time.perf_counter() - began)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        os.environ["BINCOUNTER_HOME"] = str(work / "home")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'home' / 'mlflow.db'}"
        (work / "home").mkdir()
        images, described = photos(work)
        print(f"photos: {described}")
        print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (the machine may be shared)")
        model_uri = register_model(work)
        print(f"model: {model_uri} (EfficientNet-Lite0, 224 px, 4-flip TTA)", flush=True)
        results: dict = {}
        env_src = str(Path(__file__).resolve().parents[1] / "src")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (env_src, os.environ.get("PYTHONPATH")) if p)
        # mlflow models serve runs `uvicorn` from $PATH: the venv's, as an activated venv would.
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

        port = free_port()
        command, container = ours_command(model_uri, port, work / "image")
        if container or command[0] == "docker":
            print(f"ours: in {os.environ['BENCH_SERVE_IMAGE']} ({command[0]})", flush=True)
        try:
            ours = start(command, port, "/readyz", work / "ours.log")
            try:
                measure("ours", port, [("/v1/count", b, {"Content-Type": "image/jpeg"}) for b in images], results)
                import psutil

                tree = [p for p in [psutil.Process(ours.pid), *psutil.Process(ours.pid).children(recursive=True)]
                        if "python" in p.name()]  # not docker's or buildah's own processes
                # PSS: shared library pages (onnxruntime, numpy) counted once across the processes.
                print(f"   ours memory: {sum(p.memory_full_info().pss for p in tree) / 2**20:.0f} MiB proportional "
                      f"set size, server and {len(tree) - 1} child processes", flush=True)
            finally:
                stop(ours)
        finally:
            if container:
                subprocess.run(["buildah", "rm", container], capture_output=True)

        port = free_port()
        mlflow_cmd = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", model_uri,
                      "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
        baseline = start(mlflow_cmd, port, "/ping", work / "mlflow.log")
        try:
            def body(b: bytes) -> bytes:
                return json.dumps({"dataframe_split": {"columns": ["image"],
                                                       "data": [[base64.b64encode(b).decode()]]}}).encode()
            measure("mlflow", port, [("/invocations", body(b), {"Content-Type": "application/json"}) for b in images],
                    results)
        finally:
            stop(baseline)

        raw = raw_limits(model_uri, images)
        print(f"raw onnxruntime: {raw['onnxruntime']:.1f} photos/s, torch eager: {raw['torch eager']:.1f} photos/s "
              f"(8 photos = 32 views per call, decoded and resized beforehand)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        ratio1 = results[("ours", 1)]["photos_per_s"] / results[("mlflow", 1)]["photos_per_s"]
        ratio8 = results[("ours", 8)]["photos_per_s"] / results[("mlflow", 8)]["photos_per_s"]
        print(f"concurrency 1: ours / mlflow = {ratio1:.2f}")
        print(f"concurrency 8: ours / raw onnxruntime limit = {results[('ours', 8)]['photos_per_s'] / raw['onnxruntime']:.2f} "
              f"(goal >= 0.7)")
        print(f"ratio: {ratio8:.2f} (goal >= 2.0)")


if __name__ == "__main__":
    main()
