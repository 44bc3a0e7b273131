"""``bincounter pipeline submit`` against a local HTTP server answering the KFP v2beta1 REST calls
that kfp.Client makes (healthz, experiments, runs), recording what it was sent."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from bincounter.config import ClusterConfig, PipelineConfig, RegisterConfig, SageMakerConfig, TrainConfig
from bincounter.cli import main
from pipelines.runner import arguments, compile_pipeline, for_cluster, sagemaker_arguments
from pipelines.sagemaker_pipeline import compile_pipeline as compile_sagemaker


class FakeKFP:
    """The KFP API server's side of a submit: what the client sent, and canned answers."""

    def __init__(self, final_state: str = "SUCCEEDED", release: str | None = "2.16.1"):
        self.requests: list[dict] = []
        self.final_state = final_state
        # What KFP's API server answers on healthz: its release as tag_name ("unknown" when built without one).
        self.healthz = {"commit_sha": "0" * 40, "tag_name": release, "multi_user": False}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append({"method": method, "path": url.path, "query": parse_qs(url.query), "body": body})
                route = (method, url.path)
                if route == ("GET", "/apis/v2beta1/healthz"):
                    self._answer(200, {k: v for k, v in fake.healthz.items() if v is not None})
                elif route == ("GET", "/apis/v2beta1/experiments"):
                    self._answer(200, {})  # none yet: the client creates it
                elif route == ("POST", "/apis/v2beta1/experiments"):
                    self._answer(200, {"experiment_id": "exp-1", "display_name": body["display_name"]})
                elif route == ("POST", "/apis/v2beta1/runs"):
                    self._answer(200, {"run_id": "run-1", "display_name": body["display_name"], "state": "PENDING"})
                elif route == ("GET", "/apis/v2beta1/runs/run-1"):
                    self._answer(200, {"run_id": "run-1", "state": fake.final_state})
                else:
                    self._answer(404, {"error": f"no route {method} {url.path}"})

            def do_GET(self):  # noqa: N802
                self._handle("GET")

            def do_POST(self):  # noqa: N802
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeKFP":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def created_run(self) -> dict:
        (run,) = [r["body"] for r in self.requests if (r["method"], r["path"]) == ("POST", "/apis/v2beta1/runs")]
        return run


@pytest.fixture(autouse=True)
def _kfp_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client keeps a context file under ~/.config/kfp


def test_submit_uploads_the_compiled_pipeline_with_the_given_arguments(tmp_path, capsys):
    argv = ["pipeline", "submit", "--host", "", "--experiment", "bin-experiments", "--run-name", "nightly",
            "--train.epochs", "3", "--train.backbone", "resnet18", "--registry.metric", "rmse",
            "--cluster.tracking-uri", "http://mlflow.example:5000", "--wait"]
    with FakeKFP() as kfp_api:
        argv[3] = kfp_api.url
        main(argv)
        run = kfp_api.created_run()
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    experiments = [r for r in kfp_api.requests if (r["method"], r["path"]) == ("POST", "/apis/v2beta1/experiments")]
    assert experiments[0]["body"]["display_name"] == "bin-experiments"

    cfg = PipelineConfig(train=TrainConfig(epochs=3, backbone="resnet18"), registry=RegisterConfig(metric="rmse"))
    cluster = ClusterConfig(tracking_uri="http://mlflow.example:5000")
    expected_args = arguments(for_cluster(cfg, cluster), cluster.tracking_uri, cluster)
    assert run["runtime_config"]["parameters"] == json.loads(json.dumps(expected_args))
    assert run["runtime_config"]["parameters"]["train"]["epochs"] == 3
    assert run["runtime_config"]["parameters"]["deploy"]["target"] == "kubernetes"  # not a server in the pod
    # What was uploaded is the compiled pipeline (spec and its kfp-kubernetes platform spec).
    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path / "expected.yaml", cfg, cluster).read_text()))
    assert run["pipeline_spec"]["pipeline_spec"] == json.loads(json.dumps(docs[0]))
    assert run["pipeline_spec"]["platform_spec"] == json.loads(json.dumps(docs[1]))
    # --wait followed the run.
    assert ("GET", "/apis/v2beta1/runs/run-1") in [(r["method"], r["path"]) for r in kfp_api.requests]


def test_submit_prints_the_run_url_and_a_failed_run_exits_non_zero(capsys):
    with FakeKFP(final_state="FAILED") as kfp_api:
        with pytest.raises(SystemExit) as exit_:
            main(["pipeline", "submit", "--host", kfp_api.url, "--wait"])
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert f"{kfp_api.url}/#/runs/details/run-1" in captured.out
    assert "ended FAILED" in captured.err


def test_submit_without_wait_only_starts_the_run(capsys):
    with FakeKFP() as kfp_api:
        main(["pipeline", "submit", "--host", kfp_api.url, "--cluster.namespace", "team-a"])
    paths = [(r["method"], r["path"]) for r in kfp_api.requests]
    assert ("POST", "/apis/v2beta1/runs") in paths and ("GET", "/apis/v2beta1/runs/run-1") not in paths
    lists = [r for r in kfp_api.requests if (r["method"], r["path"]) == ("GET", "/apis/v2beta1/experiments")]
    assert lists[0]["query"]["namespace"] == ["team-a"]
    assert f"{kfp_api.url}/#/runs/details/run-1" in capsys.readouterr().out


def test_submit_sagemaker_uploads_the_sagemaker_variant_with_the_account_as_its_argument(tmp_path):
    argv = ["pipeline", "submit", "--host", "", "--backend", "sagemaker", "--train.epochs", "5",
            "--sagemaker.role-arn", "arn:aws:iam::123456789012:role/bincounter-sagemaker",
            "--sagemaker.bucket", "team-bins", "--sagemaker.instance-count", "2",
            "--cluster.tracking-uri", "http://mlflow.example:5000"]
    with FakeKFP() as kfp_api:
        argv[3] = kfp_api.url
        main(argv)
        run = kfp_api.created_run()
    sm = SageMakerConfig(role_arn="arn:aws:iam::123456789012:role/bincounter-sagemaker", bucket="team-bins",
                         instance_count=2)
    cfg = PipelineConfig(train=TrainConfig(epochs=5))
    cluster = ClusterConfig(tracking_uri="http://mlflow.example:5000")
    params = run["runtime_config"]["parameters"]
    assert params == json.loads(json.dumps(sagemaker_arguments(cfg, sm, cluster)))
    assert params["sagemaker"]["bucket"] == "team-bins" and params["sagemaker"]["instance_count"] == 2
    assert params["train"]["epochs"] == 5 and params["tracking_uri"] == "http://mlflow.example:5000"
    assert "deploy" not in params  # the endpoint is the variant's deploy; no Kubernetes target
    spec, platform = yaml.safe_load_all(compile_sagemaker(tmp_path / "sm.yaml", cfg, sm, cluster).read_text())
    # Its pods run with the cluster's settings: the spec travels with its kfp-kubernetes platform spec.
    assert run["pipeline_spec"]["pipeline_spec"] == json.loads(json.dumps(spec))
    assert run["pipeline_spec"]["platform_spec"] == json.loads(json.dumps(platform))
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "bincounter-sagemaker"


def test_submit_refuses_options_of_the_other_backend():
    with pytest.raises(SystemExit, match="apply to --backend sagemaker only"):
        main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--sagemaker.bucket", "team-bins"])
    with pytest.raises(SystemExit, match="does not apply to --backend sagemaker"):
        main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--backend", "sagemaker", "--cluster.gpus", "1"])


def test_submit_refuses_a_server_older_than_the_backend_the_yaml_is_compiled_for():
    with FakeKFP(release="2.14.1") as kfp_api:
        with pytest.raises(SystemExit, match="runs 2.14.1, older than the 2.15 this pipeline is compiled for"):
            main(["pipeline", "submit", "--host", kfp_api.url])
    assert not [r for r in kfp_api.requests if r["method"] == "POST"]  # nothing uploaded, nothing started


def test_compiled_for_the_servers_backend_it_submits_without_what_that_backend_rejects():
    with FakeKFP(release="2.14.1") as kfp_api:
        main(["pipeline", "submit", "--host", kfp_api.url, "--cluster.kfp-backend", "2.14"])
        run = kfp_api.created_run()
    executors = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    secrets = [s for e in executors.values() for s in e["secretAsEnv"]]
    assert secrets and all("optional" not in s for s in secrets)  # 2.14 refuses the field


def test_a_server_that_does_not_say_its_release_is_submitted_to_with_a_warning(caplog):
    with FakeKFP(release="unknown") as kfp_api:
        main(["pipeline", "submit", "--host", kfp_api.url])
        kfp_api.created_run()
    assert "does not report its release" in caplog.text
