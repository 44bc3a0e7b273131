"""The local deployment target, end to end: a real server process serving a real MLflow model."""

from __future__ import annotations

import inspect
import json
import os
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bincounter import paths
from bincounter.serving import client
from bincounter.config import DeployConfig
from bincounter.deploy import local
from tests import width_model

pytestmark = pytest.mark.slow

# The server tests' fake model (tests/width_model.py, count = width // 16 here) logged as a
# "model from code": its source goes into the model, so the server process needs nothing from
# the test modules to load it. FAKE_MODEL_LOAD_SECONDS makes loading slow.
FAKE_MODEL_CODE = inspect.getsource(width_model) + textwrap.dedent(
    """

    import os
    import time

    import mlflow


    class FakeCounter(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            time.sleep(float(os.environ.get("FAKE_MODEL_LOAD_SECONDS", "0")))
            self.model = WidthModel(px_per_item=16)

        def predict(self, context, model_input, params=None):
            return self.model.predict(model_input)


    mlflow.models.set_model(FakeCounter())
    """
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("BINCOUNTER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def model_uri(tmp_path: Path, home: Path, monkeypatch) -> str:
    """A fake pyfunc registered as bincounter-test@champion in a SQLite store under tmp_path."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = tmp_path / "fake_model.py"
    code.write_text(FAKE_MODEL_CODE)
    # Scoped, so the global MLflow state of this test process is left as it was.
    with _use_tracking_uri(tracking_uri):
        experiment_id = mlflow.create_experiment("deploy-test", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=str(code), pip_requirements=["mlflow"])
        version = mlflow.register_model(info.model_uri, "bincounter-test")
        mlflow.MlflowClient().set_registered_model_alias("bincounter-test", "champion", version.version)
    # The server process finds the store through the environment it inherits.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    return "models:/bincounter-test@champion"


@pytest.fixture
def deployments():
    """Names deployed by a test; stopped afterwards whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        local.stop(name)


def _jpeg(path: Path, width: int) -> Path:
    Image.new("RGB", (width, 48), (120, 80, 40)).save(path, format="JPEG")
    return path


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_deploy_count_and_stop(tmp_path: Path, home: Path, model_uri: str, deployments: list[str]) -> None:
    deployments.append("t-serve")
    info = local.deploy(DeployConfig(target="local", model_uri=model_uri, port=0), name="t-serve")
    assert info["target"] == "local" and info["name"] == "t-serve"
    assert info["url"].startswith("http://127.0.0.1:")
    pid = info["pid"]

    state_file = paths.deployments_dir() / "t-serve.json"
    state = json.loads(state_file.read_text())
    assert state["pid"] == pid and state["url"] == info["url"] and state["model_uri"] == model_uri
    assert Path(state["log"]).is_file() and state["started_at"]
    assert local.status("t-serve")["ready"] is True

    results = client.count_images(info["url"], [_jpeg(tmp_path / "a.jpg", 64), _jpeg(tmp_path / "b.jpg", 32)])
    assert [r["count"] for r in results] == [4, 2]
    first = results[0]
    assert first["confidence"] == pytest.approx(0.9)
    probs = width_model.WidthModel().probabilities(4)
    assert first["expected_count"] == pytest.approx(float(probs @ np.arange(width_model.NUM_CLASSES)))
    assert first["probabilities"] == pytest.approx(probs.tolist())
    assert first["model_uri"] == model_uri
    assert first["path"] == str(tmp_path / "a.jpg")

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(RuntimeError, match="400"):
        client.count_images(info["url"], [bad])

    assert local.stop("t-serve") is True
    assert _gone(pid)
    assert not state_file.exists()
    assert local.status("t-serve") == {"name": "t-serve", "running": False, "ready": False}
    assert local.stop("t-serve") is False
    with pytest.raises(ConnectionError, match=info["url"]):
        client.count_images(info["url"], [tmp_path / "a.jpg"])


def test_dispatch_through_the_package(home: Path, model_uri: str, deployments: list[str]) -> None:
    from bincounter import deploy

    deployments.append("t-dispatch")
    info = deploy.deploy(DeployConfig(model_uri=model_uri), name="t-dispatch")
    with urllib.request.urlopen(f"{info['url']}/healthz", timeout=5) as resp:
        assert resp.status == 200
    # Deploying again under the same name replaces the running server.
    again = deploy.deploy(DeployConfig(model_uri=model_uri), name="t-dispatch")
    assert again["pid"] != info["pid"] and _gone(info["pid"])
    assert deploy.stop("local", "t-dispatch") is True
    assert _gone(again["pid"])


def test_unloadable_model_fails_cleanly(tmp_path: Path, home: Path, deployments: list[str]) -> None:
    deployments.append("t-broken")
    cfg = DeployConfig(model_uri=str(tmp_path / "no-such-model"))
    started = time.monotonic()
    with pytest.raises(local.LocalDeployError, match="exited with code 1") as excinfo:
        local.deploy(cfg, name="t-broken", timeout=120)
    assert time.monotonic() - started < 60  # it noticed the exit rather than waiting out the timeout
    assert "no-such-model" in str(excinfo.value)  # the log tail explains why
    assert _gone(excinfo.value.pid)
    assert not (paths.deployments_dir() / "t-broken.json").exists()


def test_slow_model_times_out_and_is_killed(home: Path, model_uri: str, deployments: list[str], monkeypatch) -> None:
    monkeypatch.setenv("FAKE_MODEL_LOAD_SECONDS", "600")
    deployments.append("t-slow")
    with pytest.raises(local.LocalDeployError, match="not ready after") as excinfo:
        local.deploy(DeployConfig(model_uri=model_uri), name="t-slow", timeout=8)
    assert _gone(excinfo.value.pid)
    assert not (paths.deployments_dir() / "t-slow.json").exists()


def test_stale_state_file_is_not_an_error(home: Path) -> None:
    folder = paths.deployments_dir()
    folder.mkdir(parents=True)
    # A pid that cannot be a live server: far above any pid_max.
    (folder / "t-stale.json").write_text(json.dumps({"pid": 2**22 + 12345, "url": "http://127.0.0.1:1"}))
    assert local.status("t-stale")["running"] is False
    assert local.stop("t-stale") is False
    assert not (folder / "t-stale.json").exists()


def test_invalid_name_is_rejected(home: Path) -> None:
    with pytest.raises(ValueError, match="invalid deployment name"):
        local.stop("../etc/passwd")


@pytest.mark.parametrize("fixed_port", [False, True])
def test_a_new_version_that_never_gets_ready_leaves_the_old_one_serving(tmp_path: Path, home: Path, model_uri: str,
                                                                        deployments: list[str], fixed_port) -> None:
    """Blue/green: the old server answers until the new one is ready. On a fixed port the old one
    must make room, and is started again from its recorded spec when the new one fails."""
    deployments.append("t-rollback")
    port = _free_port() if fixed_port else 0
    first = local.deploy(DeployConfig(model_uri=model_uri, port=port), name="t-rollback",
                         labels={"bincounter.dev/model-version": "1"})
    with pytest.raises(local.LocalDeployError, match=f"serves {model_uri} again") as excinfo:
        local.deploy(DeployConfig(model_uri=str(tmp_path / "no-such-model"), port=port), name="t-rollback",
                     timeout=120)
    assert excinfo.value.rolled_back_to == model_uri
    now = local.status("t-rollback")
    assert now["ready"] and now["model_uri"] == model_uri and now["labels"] == {"bincounter.dev/model-version": "1"}
    assert (now["pid"] == first["pid"]) is not fixed_port  # the same server kept, or the old spec started again
    results = client.count_images(now["url"], [_jpeg(tmp_path / "a.jpg", 64)])
    assert results[0]["model_uri"] == model_uri


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
