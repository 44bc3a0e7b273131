"""The model server as users meet it: a real ``python -m bincounter.serving`` process on loopback,
worker processes, ONNX Runtime, and a fuzz of hostile requests between good ones."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import bincounter
from bincounter.model.networks import ModelSpec, build_model
from tests import serve_payloads as payloads

pytestmark = pytest.mark.slow

MAX_BODY = 2 * 2**20
MAX_IMAGES = 8
MAX_PIXELS = 4_000_000
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def make_model_dir(out: Path) -> Path:
    """An untrained tiny CNN in training's output layout (model.pt + model_spec.json)."""
    torch.manual_seed(0)
    spec = ModelSpec(backbone="tiny_cnn", num_classes=6, image_size=64, class_names=tuple("012345"), tta=True)
    model = build_model(spec, pretrained="none").eval()
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "spec": spec.to_dict(), "epoch": 0}, out / "model.pt")
    (out / "model_spec.json").write_text(json.dumps(spec.to_dict()))
    return out


class Server:
    """``python -m bincounter.serving`` in its own process group, stopped by ``close``."""

    def __init__(self, tmp: Path, model_uri: str, *extra: str, env: dict | None = None):
        sock = __import__("socket").socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.log_path = tmp / f"server-{self.port}.log"
        child_env = {**os.environ, **(env or {}),
                     "PYTHONPATH": os.pathsep.join([str(Path(bincounter.__file__).parents[1]),
                                                    os.environ.get("PYTHONPATH", "")])}
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bincounter.serving", "--model-uri", model_uri, "--port", str(self.port),
             "--max-body-bytes", str(MAX_BODY), "--max-images", str(MAX_IMAGES), "--max-pixels", str(MAX_PIXELS),
             *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
        deadline = time.monotonic() + 240
        while True:
            assert self.proc.poll() is None, f"server exited:\n{self.log_tail()}"
            ready = self.get("/readyz")
            if ready and ready[0] == 200:
                self.ready = ready[1]
                break
            assert time.monotonic() < deadline, f"server not ready:\n{self.log_tail()}"
            time.sleep(0.3)

    def get(self, path: str) -> tuple[int, dict | str] | None:
        try:
            with _opener.open(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                body = r.read()
                return r.status, json.loads(body) if r.headers.get_content_type() == "application/json" else body.decode()
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except OSError:
            return None

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def memory(self) -> int:
        """Resident memory of the server and its workers, in bytes."""
        proc = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"), str(model_dir), "--workers", "2", "--max-queue", "512")
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(model_dir):
    from bincounter.model.predictor import Predictor

    predictor = Predictor.from_dir(model_dir)
    return lambda data: predictor.predict_bytes([data])[0]


def send(port: int, probe: payloads.Probe, conn: http.client.HTTPConnection | None = None):
    """(status, body, connection to reuse); raises on a dropped connection."""
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    if probe.chunked:
        chunks = (probe.body[i:i + 65536] for i in range(0, len(probe.body), 65536))
        conn.request(probe.method, probe.path, body=chunks, headers=probe.headers, encode_chunked=True)
    else:
        conn.request(probe.method, probe.path, body=probe.body, headers=probe.headers)
    response = conn.getresponse()
    body = response.read()
    if response.will_close:
        conn.close()
        conn = None
    return response.status, response.headers.get("content-type", ""), body, conn


def check_good(probe: payloads.Probe, body: dict | list, reference) -> None:
    answer = body["predictions"][0] if isinstance(body, dict) and "predictions" in body else body
    answer = answer[0] if isinstance(answer, list) else answer
    want = reference(probe.good)
    assert answer["count"] == want["count"]
    np.testing.assert_allclose(answer["probabilities"], want["probabilities"], atol=1e-4)
    if probe.expected is None:
        assert "expected" not in answer and "match" not in answer
    else:
        assert answer["expected"] == probe.expected
        assert answer["match"] is (want["count"] == probe.expected)
        if probe.expected < 6:
            assert answer["probability_of_expected"] == pytest.approx(want["probabilities"][probe.expected], abs=1e-4)
        else:  # a count the model has no class for: no probability, a person decides
            assert answer["probability_of_expected"] is None and answer["verdict"] == "unsure"


def test_the_native_crash_is_reproduced_in_torchvision_and_refused_by_our_decoder(tmp_path):
    """The issue's killer request: torchvision's decoder dies on it; ours refuses it from the header."""
    from bincounter.model.transforms import ImageTooLarge, decode_untrusted

    data = payloads.huge_png()
    assert len(data) < 1024
    code = ("import sys, torch; from torchvision.io import decode_image; "
            "decode_image(torch.frombuffer(bytearray(sys.stdin.buffer.read()), dtype=torch.uint8))")
    crashed = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=120)
    # A segfault (-11) in the versions this was found with; any non-zero exit shows it is not safe to call.
    assert crashed.returncode != 0
    with pytest.raises(ImageTooLarge, match="pixels"):
        decode_untrusted(data)


def test_fuzz_hostile_requests_between_good_ones(server: Server, reference) -> None:
    rng = random.Random(20261202)
    probes: list[payloads.Probe] = []
    while sum(p.kind != "good" for p in probes) < 1000:
        probes += payloads.hostile(rng, MAX_BODY, MAX_IMAGES)
    probes += [payloads.good(rng) for _ in range(300)]
    rng.shuffle(probes)
    kinds = {p.kind for p in probes} - {"good"}
    assert len(kinds) >= 15
    memory_before = server.memory()

    results: list[tuple[payloads.Probe, int, str, bytes]] = []
    dropped: list[str] = []
    lock = threading.Lock()
    local = threading.local()

    def one(probe: payloads.Probe) -> None:
        try:
            status, content_type, body, local.conn = send(server.port, probe, getattr(local, "conn", None))
        except (OSError, http.client.HTTPException) as exc:
            local.conn = None
            with lock:
                dropped.append(f"{probe.kind}: {type(exc).__name__}: {exc}")
            return
        with lock:
            results.append((probe, status, content_type, body))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, probes))

    assert not dropped, dropped[:10]
    assert len(results) == len(probes)
    server_errors = [(p.kind, s, b[:200]) for p, s, _, b in results if s >= 500]
    assert not server_errors, server_errors[:10]
    wrong = [(p.kind, p.path[:60], s, b[:160]) for p, s, _, b in results if s not in p.allowed]
    assert not wrong, (sorted({w[0] for w in wrong}), wrong[:10])
    not_json = [(p.kind, s, ct) for p, s, ct, _ in results if not ct.startswith("application/json")]
    assert not not_json, not_json[:10]
    for probe, status, _, body in results:
        if probe.good is not None:
            check_good(probe, json.loads(body), reference)

    assert server.get("/healthz") == (200, {"status": "ok"})
    status, ready = server.get("/readyz")
    assert status == 200 and ready["backend"] == "onnx" and len(ready["worker_pids"]) == 2
    # Memory stays bounded: the bombs were refused from their headers, nothing piles up.
    growth = server.memory() - memory_before
    assert growth < 400 * 2**20, f"server and workers grew by {growth / 2**20:.0f} MiB"
    status, text = server.get("/metrics")
    assert status == 200
    assert 'bincounter_http_requests_total{endpoint="/v1/count",method="POST",status="413"}' in text
    assert "bincounter_batch_size_bucket" in text and "bincounter_predicted_count_bucket" in text
    assert 'bincounter_model_info{backend="onnx"' in text
    assert server.proc.poll() is None


def test_a_worker_killed_during_a_request_is_replaced_and_service_goes_on(server: Server, reference) -> None:
    import base64

    rng = random.Random(7)
    # Eight large photos in one request keep a worker busy for a while (decode and resize).
    big = [payloads.big_photo(rng) for _ in range(MAX_IMAGES)]
    body = json.dumps({"instances": [{"image": {"b64": base64.b64encode(b).decode()}} for b in big]}).encode()
    probe = payloads.Probe("big", "POST", "/v1/models/bincounter:predict", body, {"Content-Type": "application/json"})
    _, ready = server.get("/readyz")
    old_pids = set(ready["worker_pids"])

    answer: dict = {}

    def request() -> None:
        status, _, raw, _ = send(server.port, probe)
        answer.update(status=status, body=json.loads(raw))

    thread = threading.Thread(target=request)
    thread.start()
    # Kill whichever worker picks the batch up: the first whose CPU time climbs.
    procs = {pid: psutil.Process(pid) for pid in old_pids}
    start = {pid: sum(p.cpu_times()[:2]) for pid, p in procs.items()}
    deadline = time.monotonic() + 60
    victim = None
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
        for pid, p in procs.items():
            if sum(p.cpu_times()[:2]) - start[pid] > 0.05:
                victim = pid
                break
    assert victim is not None, "no worker got busy"
    os.kill(victim, signal.SIGKILL)
    thread.join(120)
    # The batch was retried on the replacement: the request still got its answer.
    assert answer["status"] == 200, answer
    assert [p["count"] for p in answer["body"]["predictions"]] == [reference(b)["count"] for b in big]

    deadline = time.monotonic() + 120
    while True:
        status, ready = server.get("/readyz")
        if status == 200 and len(ready["worker_pids"]) == 2 and victim not in ready["worker_pids"]:
            break
        assert time.monotonic() < deadline, ready
        time.sleep(0.5)
    good = payloads.good(rng)
    status, _, raw, _ = send(server.port, good)
    assert status == 200
    check_good(good, json.loads(raw), reference)
    _, text = server.get("/metrics")
    assert "bincounter_worker_restarts_total 1.0" in text
    assert server.proc.poll() is None


def test_serves_a_registered_model_by_alias_with_its_onnx_export(tmp_path, isolated_home) -> None:
    from bincounter.config import RegisterConfig
    from bincounter.registry.register import register
    from tests.judges import always

    model_dir = make_model_dir(tmp_path / "model")
    register(RegisterConfig(model_name="served"), model_dir, {"accuracy": 0.5}, judge=always())
    server = Server(tmp_path, "models:/served@champion", "--workers", "1")
    try:
        assert server.ready["backend"] == "onnx" and server.ready["model_version"] == "1"
        # No ONNX export at startup: the registered model carries its model.onnx.
        assert "exporting it now" not in server.log_path.read_text()
        status, text = server.get("/metrics")
        assert 'bincounter_model_info{backend="onnx",model_uri="models:/served@champion",version="1"} 1.0' in text
    finally:
        server.close()
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("endpoint") == "/readyz"]
    assert access and {"ts", "method", "path", "status", "ms", "client"} <= set(access[-1])


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_a_folder_mixing_two_models_files_is_refused_when_it_loads(tmp_path, backend) -> None:
    """model_spec.json (which sets the transform) from one model, model.pt / model.onnx from
    another: refused by name at load, not a runtime error on every request."""
    from bincounter.model.onnx_export import export_onnx
    from bincounter.serving.worker import EngineSpec, load_engine

    model_dir = make_model_dir(tmp_path / "model")
    onnx = str(export_onnx(model_dir, tmp_path / "model.onnx"))
    engine = load_engine(EngineSpec(backend, str(model_dir), onnx_path=onnx))  # consistent: loads and answers
    assert engine.run([payloads.jpeg(random.Random(0), 64, 64)])[0][0] == "ok"
    spec = json.loads((model_dir / "model_spec.json").read_text())
    (model_dir / "model_spec.json").write_text(json.dumps({**spec, "image_size": 96}))
    with pytest.raises(ValueError, match="the files come from two different models"):
        load_engine(EngineSpec(backend, str(model_dir), onnx_path=onnx))


def test_a_worker_that_cannot_restart_fails_loud_and_recovers_when_it_can(tmp_path) -> None:
    """One worker on a local model folder: move the folder, kill -9 the worker. The server must not
    hang the batch nor stay ready: /readyz says 503 with the reason and requests get 503 at once.
    When the folder is back, the worker restarts and the server serves again."""
    folder = make_model_dir(tmp_path / "model")
    server = Server(tmp_path, str(folder), "--workers", "1")
    try:
        photo = payloads.jpeg(random.Random(1), 64, 64)
        headers = {"Content-Type": "image/jpeg"}
        assert send(server.port, payloads.Probe("good", "POST", "/v1/count", photo, headers))[0] == 200
        (pid,) = server.ready["worker_pids"]
        folder.rename(tmp_path / "moved")
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        status, _, body, _ = send(server.port, payloads.Probe("good", "POST", "/v1/count", photo, headers))
        assert status == 503 and time.monotonic() - started < 30, (status, body, server.log_tail())
        assert "worker" in json.loads(body)["detail"]
        deadline = time.monotonic() + 30
        while (ready := server.get("/readyz"))[0] != 503:
            assert time.monotonic() < deadline, ready
            time.sleep(0.2)
        assert "worker" in ready[1]["error"]
        started = time.monotonic()
        status, _, body, _ = send(server.port, payloads.Probe("good", "POST", "/v1/count", photo, headers))
        assert status == 503 and time.monotonic() - started < 5, (status, body)  # at once while none runs
        (tmp_path / "moved").rename(folder)
        deadline = time.monotonic() + 90
        while (ready := server.get("/readyz"))[0] != 200:
            assert time.monotonic() < deadline, (ready, server.log_tail())
            time.sleep(0.5)
        assert send(server.port, payloads.Probe("good", "POST", "/v1/count", photo, headers))[0] == 200
    finally:
        server.close()
