"""`make ui` starts an MLflow server on the local store that answers its REST API."""

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from bincounter_demo.s3server import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_make_ui_serves_the_mlflow_rest_api(isolated_home):
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{isolated_home / 'mlflow.db'}").create_experiment("ui-check")
    port = free_port()
    env = {**os.environ, "BINCOUNTER_HOME": str(isolated_home)}
    env.pop("MLFLOW_TRACKING_URI")
    proc = subprocess.Popen(["make", "--no-print-directory", "ui", f"UI_PORT={port}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    body = json.load(response)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"MLflow UI did not answer: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(1)
        assert "ui-check" in {e["name"] for e in body["experiments"]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
