"""The model server's HTTP contract, with a fake model (no torch, no MLflow)."""

from __future__ import annotations

import base64
import importlib.util
import io
import socket
import threading
import time

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bincounter.serving import app as serve
from bincounter.serving.counting import inventory_check
from bincounter.config import ServeConfig
from tests.live_server import serving
from tests.width_model import NUM_CLASSES, WidthModel

MODEL_URI = "models:/bincounter@champion"
CFG = ServeConfig(model_uri=MODEL_URI)
LIMITS = ServeConfig()


def _jpeg(width: int = 32, height: int = 24, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="JPEG")
    return buf.getvalue()


def _png(width: int = 16, height: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (0, 0, 255)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def client(width_model: WidthModel):
    with TestClient(serve.create_app(CFG, model=width_model)) as c:
        yield c


def _check_result(body: dict, count: int) -> None:
    assert set(body) == {"count", "confidence", "expected_count", "probabilities", "model_uri", "model_version"}
    assert body["model_version"] is None  # a model given in process: no registry version
    assert body["count"] == count and isinstance(body["count"], int)
    assert body["confidence"] == pytest.approx(0.9)
    probs = WidthModel().probabilities(count)
    assert body["expected_count"] == pytest.approx(float(probs @ np.arange(NUM_CLASSES)))
    assert body["probabilities"] == pytest.approx(probs.tolist())
    assert all(isinstance(p, float) for p in body["probabilities"])
    assert body["model_uri"] == MODEL_URI


# -- probes ----------------------------------------------------------------------------


def test_probes_when_ready(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["status"] == "ready" and r.json()["model_uri"] == MODEL_URI
    assert client.get("/ping").status_code == 200
    r = client.get("/v1/models/bincounter")
    assert r.status_code == 200 and r.json() == {"name": "bincounter", "ready": True}


def test_not_ready_before_the_model_loads(width_model: WidthModel) -> None:
    release = threading.Event()

    def slow_loader(uri: str) -> WidthModel:
        assert uri == MODEL_URI
        release.wait(10)
        return width_model

    with TestClient(serve.create_app(CFG, loader=slow_loader)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert c.get("/ping").status_code == 503
        assert c.get("/v1/models/bincounter").status_code == 503
        r = c.post("/v1/count", content=_jpeg())
        assert r.status_code == 503 and "not loaded" in r.json()["detail"]
        release.set()
        deadline = time.monotonic() + 10
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "model never became ready"
            time.sleep(0.02)
        assert c.post("/v1/count", content=_jpeg()).status_code == 200


def test_not_ready_without_lifespan() -> None:
    # No `with`: the lifespan (and so the loader) never runs.
    c = TestClient(serve.create_app(CFG))
    assert c.get("/healthz").status_code == 200
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "not_loaded"


def test_load_failure_is_reported() -> None:
    def broken_loader(uri: str):
        raise OSError("no such model")

    failures = []
    app = serve.create_app(CFG, loader=broken_loader)
    app.state.on_load_failure = failures.append
    with TestClient(app) as c:
        deadline = time.monotonic() + 10
        while c.get("/readyz").json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = c.get("/readyz")
        assert r.status_code == 503 and "no such model" in r.json()["error"]
        r = c.post("/v1/count", content=_jpeg())
        assert r.status_code == 503 and "no such model" in r.json()["detail"]
    assert len(failures) == 1 and isinstance(failures[0], OSError)


# -- /v1/count and /invocations ------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/count", "/invocations"])
def test_count_one_image(client: TestClient, width_model: WidthModel, path: str) -> None:
    r = client.post(path, content=_jpeg(width=24), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    _check_result(r.json(), count=3)
    # PNG too, with or without a content type.
    r = client.post(path, content=_png(width=16), headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    _check_result(r.json(), count=2)
    r = client.post(path, content=_png(width=16), headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200
    assert width_model.calls == [1, 1, 1]


@pytest.mark.parametrize("path", ["/v1/count", "/invocations"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "multipart/form-data; boundary=x"])
def test_count_refuses_content_types_that_are_not_images(client: TestClient, width_model: WidthModel, path: str,
                                                          content_type: str) -> None:
    r = client.post(path, content=_png(width=16), headers={"Content-Type": content_type})
    assert r.status_code == 415 and "image" in r.json()["detail"]
    assert width_model.calls == []


@pytest.mark.parametrize("path", ["/v1/count", "/invocations"])
def test_count_errors(client: TestClient, width_model: WidthModel, path: str) -> None:
    r = client.post(path, content=b"")
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    r = client.post(path, content=b"this is not an image")
    assert r.status_code == 400
    assert "not a recognisable image" in r.json()["detail"]
    assert width_model.calls == []  # refused from the header, the model never saw it


def test_body_over_the_limit_is_413(client: TestClient, width_model: WidthModel) -> None:
    r = client.post("/v1/count", content=b"\xff" * (LIMITS.max_body_bytes + 1))
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert width_model.calls == []


def test_chunked_body_over_the_limit_is_413(width_model: WidthModel) -> None:
    def chunks():
        for _ in range(10):
            yield b"\x00" * 1000

    with TestClient(serve.create_app(CFG.model_copy(update={"max_body_bytes": 5000}), model=width_model)) as c:
        r = c.post("/v1/count", content=chunks())  # no Content-Length: chunked transfer
        assert r.status_code == 413
        assert c.post("/v1/count", content=_jpeg()).status_code == 200
    assert width_model.calls == [1]


def test_model_output_missing_columns_is_500_and_the_next_batch_is_served(width_model: WidthModel) -> None:
    predict = width_model.predict
    width_model.predict = lambda df: pd.DataFrame({"count": [1]})
    with TestClient(serve.create_app(CFG, model=width_model), raise_server_exceptions=False) as c:
        r = c.post("/v1/count", content=_jpeg())
        assert r.status_code == 500 and "detail" in r.json()
        width_model.predict = predict
        _check_result(c.post("/v1/count", content=_jpeg()).json(), 4)  # the failed batch did not stop the consumer


# -- /v1/count:batch -------------------------------------------------------------------------

needs_multipart = pytest.mark.skipif(
    importlib.util.find_spec("python_multipart") is None, reason="python-multipart is not installed"
)


@needs_multipart
def test_batch(client: TestClient, width_model: WidthModel) -> None:
    files = [
        ("files", ("a.jpg", _jpeg(width=8), "image/jpeg")),
        ("files", ("b.png", _png(width=32), "image/png")),
        ("other", ("c.jpg", _jpeg(width=16), "image/jpeg")),
    ]
    r = client.post("/v1/count:batch", files=files)
    assert r.status_code == 200, r.text
    assert [x["count"] for x in r.json()] == [1, 4, 2]
    _check_result(r.json()[0], count=1)
    assert width_model.calls == [3]


@needs_multipart
def test_batch_errors(client: TestClient) -> None:
    files = [("files", ("good.jpg", _jpeg(), "image/jpeg")), ("files", ("bad.jpg", b"garbage", "image/jpeg"))]
    r = client.post("/v1/count:batch", files=files)
    assert r.status_code == 400 and "bad.jpg" in r.json()["detail"]
    r = client.post("/v1/count:batch", data={"note": "no files"}, files=[("x", ("", b"", "image/jpeg"))])
    assert r.status_code == 400
    r = client.post("/v1/count:batch", content=_jpeg(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 415 and "multipart" in r.json()["detail"]


def test_batch_without_python_multipart_is_501(client: TestClient, monkeypatch) -> None:
    import starlette.requests

    monkeypatch.setattr(starlette.requests, "parse_options_header", None)
    r = client.post("/v1/count:batch", files=[("files", ("a.jpg", _jpeg(), "image/jpeg"))])
    assert r.status_code == 501 and "python-multipart" in r.json()["detail"]


# -- KServe v1 -------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_kserve_predict(client: TestClient, width_model: WidthModel) -> None:
    payload = {"instances": [{"image": {"b64": _b64(_jpeg(width=8))}}, {"image": {"b64": _b64(_png(width=40))}}]}
    r = client.post("/v1/models/bincounter:predict", json=payload)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert [p["count"] for p in predictions] == [1, 5]
    _check_result(predictions[0], count=1)
    assert width_model.calls == [2]  # one batched predict call


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ({"inputs": []}, 400, "instances"),
        ({"instances": []}, 400, "empty"),
        ({"instances": [{"image": {"b64": "%%%not base64"}}]}, 400, "base64"),
        ({"instances": [{"image": 3}]}, 400, "instance 0"),
        ({"instances": [{"image": {"b64": _b64(_jpeg())}}, {"image": {"b64": _b64(b"junk")}}]}, 400, "instance 1"),
        ({"instances": [{"image": {"b64": _b64(_jpeg())}}] * (LIMITS.max_images + 1)}, 413, "instances"),
    ],
)
def test_kserve_errors(client: TestClient, payload, status: int, needle: str) -> None:
    r = client.post("/v1/models/bincounter:predict", json=payload)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_kserve_bad_json(client: TestClient) -> None:
    r = client.post("/v1/models/bincounter:predict", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["detail"]


def test_kserve_model_name(width_model: WidthModel) -> None:
    with TestClient(serve.create_app(CFG.model_copy(update={"model_name": "counter"}), model=width_model)) as c:
        assert c.get("/v1/models/counter").status_code == 200
        assert c.get("/v1/models/other").status_code == 404
        payload = {"instances": [{"image": {"b64": _b64(_jpeg())}}]}
        assert c.post("/v1/models/other:predict", json=payload).status_code == 404
        assert c.post("/v1/models/counter:predict", json=payload).status_code == 200
        assert c.get("/v1/models").json() == {"models": ["counter"]}


# -- command line ----------------------------------------------------------------------------


def test_args_fall_back_to_env() -> None:
    cfg = serve.parse_config([], {"MODEL_URI": "runs:/abc/model", "PORT": "9999", "BINCOUNTER_SERVE_WORKERS": "3"})
    assert (cfg.model_uri, cfg.port, cfg.host, cfg.workers) == ("runs:/abc/model", 9999, "127.0.0.1", 3)
    cfg = serve.parse_config(["--model-uri", "models:/m@x", "--host", "0.0.0.0", "--port", "8080", "--max-wait-ms", "2"],
                             {"MODEL_URI": "runs:/abc/model", "PORT": "9999"})
    assert (cfg.model_uri, cfg.port, cfg.host, cfg.max_wait_ms) == ("models:/m@x", 8080, "0.0.0.0", 2.0)


def test_args_default_to_the_champion() -> None:
    from bincounter.config import DeployConfig

    cfg = serve.parse_config([], {})
    assert cfg.model_uri == serve.DEFAULT_MODEL_URI == DeployConfig().model_uri
    assert cfg.port == 8080


def test_bad_env_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ServeConfig.from_env({"BINCOUNTER_SERVE_MAX_QUEUE": "0"})


def test_openapi_lists_every_endpoint(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ["/healthz", "/readyz", "/metrics", "/v1/count", "/v1/count:batch", "/v1/models/{name}:predict", "/ping",
                 "/invocations"]:
        assert path in spec["paths"]


# -- expected: the inventory check -----------------------------------------------------------


def _check_expected(body: dict, expected: int, count: int, error_rate: float = 0.05) -> None:
    from bincounter.config import VerdictConfig
    from bincounter.serving.verdict import judge

    assert body["expected"] == expected
    assert body["match"] is (count == expected)
    assert body["error_rate"] == error_rate
    if expected < NUM_CLASSES:
        assert body["probability_of_expected"] == pytest.approx(0.9 if count == expected else 0.02)
        # The posterior rule at the request's error rate, the rule's default thresholds (no evaluation here).
        want = judge(expected, body["probabilities"], 0, False, VerdictConfig(error_rate=error_rate))
        assert body["probability_record_right"] == pytest.approx(want["probability_record_right"])
        assert body["verdict"] == want["verdict"]
        if count == expected:
            assert body["verdict"] == "match"
    else:  # a count the model has no class for: it cannot judge it, a person should
        assert body["probability_of_expected"] is None and body["verdict"] == "unsure"
        assert body["probability_record_right"] is None


@pytest.mark.parametrize("expected", [0, 3, 5, 1000])
def test_expected_on_count(client: TestClient, expected: int) -> None:
    r = client.post(f"/v1/count?expected={expected}", content=_jpeg(width=24), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    _check_expected(r.json(), expected, count=3)


@pytest.mark.parametrize("headers", [
    {"X-Expected-Count": "3"},
    {"X-Amzn-SageMaker-Custom-Attributes": "expected=3"},
    {"X-Amzn-SageMaker-Custom-Attributes": "trace=abc;expected=3"},
])
def test_expected_on_invocations(client: TestClient, headers: dict) -> None:
    r = client.post("/invocations", content=_jpeg(width=24), headers={"Content-Type": "image/jpeg", **headers})
    assert r.status_code == 200, r.text
    _check_expected(r.json(), 3, count=3)
    r = client.post("/invocations?expected=3", content=_jpeg(width=24), headers={"Content-Type": "image/jpeg"})
    _check_expected(r.json(), 3, count=3)


@pytest.mark.parametrize("value", ["-1", "1001", "abc", "1.5", "", "1e3", "%EF%BC%93", "3&expected=4", "99999999"])
def test_bad_expected_is_422(client: TestClient, width_model: WidthModel, value: str) -> None:
    r = client.post(f"/v1/count?expected={value}", content=_jpeg(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 422 and "expected" in r.json()["detail"]
    r = client.post("/invocations", content=_jpeg(), headers={"Content-Type": "image/jpeg", "X-Expected-Count": value})
    assert r.status_code == 422
    assert width_model.calls == []


def test_disagreeing_expected_is_422(client: TestClient) -> None:
    r = client.post("/invocations?expected=2", content=_jpeg(), headers={"Content-Type": "image/jpeg",
                                                                         "X-Expected-Count": "3"})
    assert r.status_code == 422 and "differently" in r.json()["detail"]


def test_expected_in_kserve_instances(client: TestClient) -> None:
    payload = {"instances": [{"image": {"b64": _b64(_jpeg(width=8))}, "expected": 1},
                             {"image": {"b64": _b64(_png(width=40))}, "expected": 2},
                             {"image": {"b64": _b64(_png(width=16))}}]}
    r = client.post("/v1/models/bincounter:predict", json=payload)
    assert r.status_code == 200, r.text
    first, second, third = r.json()["predictions"]
    _check_expected(first, 1, count=1)
    _check_expected(second, 2, count=5)
    assert "expected" not in third
    r = client.post("/v1/models/bincounter:predict?expected=4", json={"instances": payload["instances"][2:]})
    _check_expected(r.json()["predictions"][0], 4, count=2)
    bad = {"instances": [{"image": {"b64": _b64(_jpeg())}, "expected": 2.5}]}
    assert client.post("/v1/models/bincounter:predict", json=bad).status_code == 422
    bad = {"instances": [{"image": {"b64": _b64(_jpeg())}, "expected": True}]}
    assert client.post("/v1/models/bincounter:predict", json=bad).status_code == 422


@needs_multipart
def test_expected_in_the_batch_form(client: TestClient) -> None:
    files = [("files", ("a.jpg", _jpeg(width=8), "image/jpeg")), ("files", ("b.png", _png(width=32), "image/png"))]
    r = client.post("/v1/count:batch", files=files, data={"expected": "1"})
    assert [x["match"] for x in r.json()] == [True, False]
    r = client.post("/v1/count:batch", files=files, data={"expected": ["1", "4"]})
    assert [x["match"] for x in r.json()] == [True, True]
    r = client.post("/v1/count:batch?expected=4", files=files)
    assert [x["expected"] for x in r.json()] == [4, 4]
    assert client.post("/v1/count:batch", files=files, data={"expected": ["1", "2", "3"]}).status_code == 422
    assert client.post("/v1/count:batch", files=files, data={"expected": "x"}).status_code == 422
    r = client.post("/v1/count:batch", files=files, data={"expected": "1", "error_rate": "0.3"})
    assert [x["error_rate"] for x in r.json()] == [0.3, 0.3]
    assert client.post("/v1/count:batch", files=files, data={"expected": "1", "error_rate": ["0.3", "0.2"]}
                       ).status_code == 422
    assert client.post("/v1/count:batch?error_rate=0.1", files=files, data={"error_rate": "0.3"}).status_code == 422


def test_inventory_check_with_a_pooled_last_class() -> None:
    from bincounter.config import VerdictConfig
    from bincounter.serving.worker import ModelInfo

    info = ModelInfo("onnx", min_count=1, class_names=("1", "2", "3", "4+"))
    row = {"count": 4, "probabilities": [0.1, 0.2, 0.3, 0.4]}
    rule = VerdictConfig(rule="thresholds")
    assert inventory_check(row, 7, info, rule) == {"expected": 7, "match": True, "probability_of_expected": 0.4,
                                                   # "4+" takes 7 and its neighbours 5, 6, 8, 9; the far share
                                                   # goes evenly to the four counts 3 or more away (1 to 4).
                                                   "probability_record_right": pytest.approx(0.95 * 0.4 / (
                                                       0.4 * (0.95 + 0.04 + 0.0075 + 0.000625)
                                                       + 0.000625 * (0.1 + 0.2 + 0.3))),
                                                   "verdict": "unsure", "error_rate": 0.05}
    # Below the model's first count it cannot judge: no probability, a person decides.
    assert inventory_check(row, 0, info) == {"expected": 0, "match": False, "probability_of_expected": None,
                                             "probability_record_right": None, "verdict": "unsure",
                                             "error_rate": 0.05}
    assert inventory_check(row, 2, info)["probability_of_expected"] == 0.2
    # The request's error rate replaces the server's; the thresholds evaluation chose replace the defaults.
    chosen = ModelInfo("onnx", min_count=1, class_names=("1", "2", "3", "4+"),
                       chosen={"posterior": {"flag_threshold": 0.45, "match_threshold": 0.99}})
    assert inventory_check(row, 1, chosen, error_rate=0.5)["error_rate"] == 0.5
    assert inventory_check(row, 1, chosen, error_rate=0.5)["verdict"] == "mismatch"
    assert inventory_check(row, 1, info, error_rate=0.5)["verdict"] == "unsure"


@pytest.mark.parametrize("value", ["0", "1", "-0.1", "nan", "inf", "abc", "", "0.2&error_rate=0.3", "1e400",
                                   "0." + "1" * 40])
def test_bad_error_rate_is_422(client: TestClient, width_model: WidthModel, value: str) -> None:
    r = client.post(f"/v1/count?expected=3&error_rate={value}", content=_jpeg(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 422 and "error_rate" in r.json()["detail"]
    r = client.post(f"/invocations?error_rate={value}", content=_jpeg(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 422
    bad = {"instances": [{"image": {"b64": _b64(_jpeg())}, "expected": 2, "error_rate": value}]}
    assert client.post("/v1/models/bincounter:predict", json=bad).status_code == 422
    assert width_model.calls == []


def test_error_rate_per_request_on_every_endpoint(client: TestClient) -> None:
    r = client.post("/v1/count?expected=0&error_rate=0.4", content=_jpeg(width=24), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    _check_expected(r.json(), 0, count=3, error_rate=0.4)
    # More wrong records make a confident other count more believable: the record is less likely right.
    calm = client.post("/v1/count?expected=0&error_rate=0.01", content=_jpeg(width=24),
                       headers={"Content-Type": "image/jpeg"}).json()
    assert calm["probability_record_right"] > r.json()["probability_record_right"]
    r = client.post("/invocations", content=_jpeg(width=24), headers={
        "Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": "expected=0; error_rate=0.4"})
    _check_expected(r.json(), 0, count=3, error_rate=0.4)
    payload = {"instances": [{"image": {"b64": _b64(_jpeg(width=24))}, "expected": 0, "error_rate": 0.4},
                             {"image": {"b64": _b64(_jpeg(width=24))}, "expected": 0}]}
    first, second = client.post("/v1/models/bincounter:predict", json=payload).json()["predictions"]
    _check_expected(first, 0, count=3, error_rate=0.4)
    _check_expected(second, 0, count=3)
    disagree = client.post("/v1/models/bincounter:predict?error_rate=0.2", json=payload)
    assert disagree.status_code == 422 and "disagrees" in disagree.json()["detail"]


# -- limits, load shedding, metrics ------------------------------------------------------------


def test_pixel_limit_is_checked_from_the_header(width_model: WidthModel) -> None:
    with TestClient(serve.create_app(CFG.model_copy(update={"max_pixels": 100}), model=width_model)) as c:
        r = c.post("/v1/count", content=_jpeg(width=32, height=24), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 413 and "pixels" in r.json()["detail"]
    assert width_model.calls == []


def test_full_queue_sheds_load_with_503(width_model: WidthModel) -> None:
    release = threading.Event()
    original = width_model.predict

    def slow_predict(df):
        release.wait(10)
        return original(df)

    width_model.predict = slow_predict
    cfg = CFG.model_copy(update={"max_queue": 2, "max_batch_size": 1, "max_wait_ms": 0})
    with TestClient(serve.create_app(cfg, model=width_model)) as c:
        answers: list[int] = []

        def post() -> None:
            answers.append(c.post("/v1/count", content=_jpeg(), headers={"Content-Type": "image/jpeg"}).status_code)

        # One image in the worker, two waiting: the queue is full.
        threads = [threading.Thread(target=post) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        r = c.post("/v1/count", content=_jpeg(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "busy" in r.json()["detail"]
        release.set()
        for t in threads:
            t.join(10)
        assert answers == [200, 200, 200]
        assert "bincounter_load_shed_total 1.0" in c.get("/metrics").text


@pytest.mark.slow
def test_concurrent_requests_share_model_calls(width_model: WidthModel) -> None:
    cfg = CFG.model_copy(update={"max_wait_ms": 200, "max_batch_size": 8})
    with TestClient(serve.create_app(cfg, model=width_model)) as c:
        results: list[int] = []

        def post() -> None:
            results.append(c.post("/v1/count", content=_jpeg(width=24), headers={"Content-Type": "image/jpeg"}).json()["count"])

        threads = [threading.Thread(target=post) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    assert results == [3] * 6
    assert len(width_model.calls) < 6 and sum(width_model.calls) == 6  # micro-batched


def test_metrics(client: TestClient) -> None:
    client.post("/v1/count?expected=3", content=_jpeg(width=24), headers={"Content-Type": "image/jpeg"})
    client.post("/v1/count", content=b"", headers={"Content-Type": "image/jpeg"})
    client.post("/no/such/path/12345")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'bincounter_http_requests_total{endpoint="/v1/count",method="POST",status="200"} 1.0' in text
    assert 'bincounter_http_requests_total{endpoint="/v1/count",method="POST",status="400"} 1.0' in text
    assert 'endpoint="unmatched"' in text and "12345" not in text  # no series per hostile path
    assert 'bincounter_predicted_count_bucket{le="3.0"} 1.0' in text
    assert "bincounter_batch_size_count 1.0" in text
    assert "bincounter_queue_depth 0.0" in text
    assert 'bincounter_model_info{backend="inline",model_uri="models:/bincounter@champion",version=""} 1.0' in text


def test_errors_are_json(client: TestClient) -> None:
    for method, path in [("GET", "/v1/count"), ("POST", "/nope"), ("DELETE", "/invocations")]:
        r = client.request(method, path)
        assert r.status_code in (404, 405) and "detail" in r.json()


def _raw_exchange(url: str, request: bytes) -> bytes:
    """Send ``request`` as it is on a fresh connection; everything the server sends before closing."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("request_bytes", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\na header without a colon\r\n\r\n",
    b"POST /v1/count HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
], ids=["request-line", "header-line", "two-lengths"])
def test_requests_that_are_not_http_get_uvicorns_plain_400(width_model: WidthModel, request_bytes: bytes) -> None:
    """The known limitation docs/serving.md states: uvicorn's parser answers these before the app sees
    them, in plain text (no supported way to make it JSON). If this fails, uvicorn changed:
    update docs/serving.md."""
    with serving(serve.create_app(CFG, model=width_model)) as url:
        head, _, body = _raw_exchange(url, request_bytes).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").lower().split("\r\n")
        assert lines[0].startswith("http/1.1 400 ")
        assert "content-type: text/plain; charset=utf-8" in lines and "connection: close" in lines
        assert body == b"Invalid HTTP request received."
        # The server goes on answering in JSON.
        health = _raw_exchange(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert health.startswith(b"HTTP/1.1 200 ") and health.endswith(b'{"status":"ok"}')
    assert width_model.calls == []


class _Tampered:
    """What a tampered model.pt could carry: unpickling it would run code."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def test_model_files_are_loaded_without_running_their_code(tmp_path, monkeypatch) -> None:
    import pickle

    import torch

    from bincounter.model.networks import load_trained

    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "spec": {}, "epoch": 0, "payload": _Tampered()}, tmp_path / "model.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_trained(tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_serving_never_imports_training() -> None:
    import subprocess
    import sys

    code = ("import sys, bincounter.serving.app, bincounter.serving.worker, bincounter.model.predictor, bincounter.registry.pyfunc; "
            "print('bincounter.training.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_images_in_flight_count_from_arrival_to_answer_for_the_autoscaler():
    """bincounter_images_in_flight (what the HPA scales on): waiting and in a batch, then none."""
    import asyncio

    from bincounter.serving.batching import Batcher

    async def scenario() -> list[int]:
        batcher = Batcher(max_batch_size=4, max_wait_s=0.0, max_queue=16)
        seen = []
        request = asyncio.create_task(batcher.submit([b"a", b"b", b"c"]))
        await asyncio.sleep(0.01)
        seen.append(batcher.in_flight)  # all three waiting
        items = await batcher.take()
        seen.append(batcher.in_flight)  # taken by a worker, not yet answered: still in flight
        for item in items:
            item.future.set_result(("ok", {}))
        await request
        seen.append(batcher.in_flight)
        gone = asyncio.create_task(batcher.submit([b"d"]))  # a client that goes away
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        seen.append(batcher.in_flight)
        return seen

    assert asyncio.run(scenario()) == [3, 3, 0, 0]
