"""``bincounter pipeline submit`` and ``schedule`` against a local HTTP server answering the KFP
v2beta1 REST calls that kfp.Client makes (healthz, experiments, runs, recurring runs), recording
what it was sent."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from bincounter.config import (ClusterConfig, IngestConfig, PipelineConfig, RegisterConfig, SageMakerConfig,
                               TrainConfig)
from bincounter.cli import main
from pipelines.runner import arguments, compile_pipeline, for_cluster, sagemaker_arguments
from pipelines.sagemaker_pipeline import compile_pipeline as compile_sagemaker
from tests.json_server import JsonServer


class FakeKFP:
    """The KFP API server's side of a submit: what the client sent, and canned answers."""

    def __init__(self, final_state: str = "SUCCEEDED", release: str | None = "2.16.1",
                 recurring_runs: list[dict] | None = None):
        self.requests: list[dict] = []
        self.final_state = final_state
        # The experiment's recurring runs already there (what GET /recurringruns lists).
        self.recurring_runs = recurring_runs or []
        # What KFP's API server answers on healthz: its release as tag_name ("unknown" when built without one).
        self.healthz = {"commit_sha": "0" * 40, "tag_name": release, "multi_user": False}

    def answer(self, method: str, path: str, headers: dict, raw: bytes) -> tuple[int, object]:
        url = urlparse(path)
        body = json.loads(raw) if raw else None
        self.requests.append({"method": method, "path": url.path, "query": parse_qs(url.query), "body": body})
        route = (method, url.path)
        if route == ("GET", "/apis/v2beta1/healthz"):
            return 200, {k: v for k, v in self.healthz.items() if v is not None}
        if route == ("GET", "/apis/v2beta1/experiments"):
            return 200, {}  # none yet: the client creates it
        if route == ("POST", "/apis/v2beta1/experiments"):
            return 200, {"experiment_id": "exp-1", "display_name": body["display_name"]}
        if route == ("POST", "/apis/v2beta1/runs"):
            return 200, {"run_id": "run-1", "display_name": body["display_name"], "state": "PENDING"}
        if route == ("GET", "/apis/v2beta1/runs/run-1"):
            return 200, {"run_id": "run-1", "state": self.final_state}
        if route == ("GET", "/apis/v2beta1/recurringruns"):
            # The proto's field is recurringRuns (camel case, unlike the rest): that is its JSON key.
            return 200, {"recurringRuns": self.recurring_runs} if self.recurring_runs else {}
        if route == ("POST", "/apis/v2beta1/recurringruns"):
            return 200, {"recurring_run_id": "rr-1", "display_name": body["display_name"], "mode": body["mode"],
                         "trigger": body["trigger"], "status": "ENABLED"}
        return 404, {"error": f"no route {method} {url.path}"}

    def __enter__(self) -> "FakeKFP":
        self.server = JsonServer(self.answer)
        self.url = self.server.url
        return self

    def __exit__(self, *exc) -> None:
        self.server.close()

    def created_run(self) -> dict:
        (run,) = [r["body"] for r in self.requests if (r["method"], r["path"]) == ("POST", "/apis/v2beta1/runs")]
        return run

    def created_recurring_run(self) -> dict:
        (job,) = [r["body"] for r in self.requests
                  if (r["method"], r["path"]) == ("POST", "/apis/v2beta1/recurringruns")]
        return job


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


REVIEWS = "s3://my-floor-bucket"


def _ingest_caching(spec: dict) -> dict:
    """The ingest task's caching options in a compiled pipeline spec (inside its ParallelFor when sharded)."""
    tasks = {}
    for component in [spec["root"], *spec["components"].values()]:
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks["ingest"]["cachingOptions"]


def test_schedule_creates_a_nightly_recurring_run_that_reingests_the_reviews(tmp_path, capsys):
    argv = ["pipeline", "schedule", "--host", "", "--cron", "0 3 * * *", "--experiment", "nightly",
            "--ingest.reviews", REVIEWS, "--train.epochs", "3", "--cluster.service-account", "bincounter-pipeline",
            "--cluster.tracking-uri", "http://mlflow.example:5000"]
    with FakeKFP() as kfp_api:
        argv[3] = kfp_api.url
        main(argv)
        job = kfp_api.created_recurring_run()
    assert job["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}  # KFP's 6 fields: seconds first
    assert str(job["max_concurrency"]) == "1" and job["no_catchup"] is True and job["mode"] == "ENABLE"
    assert job["display_name"] == "bincounter-retrain" and job["experiment_id"] == "exp-1"
    assert job["service_account"] == "bincounter-pipeline"
    experiments = [r for r in kfp_api.requests if (r["method"], r["path"]) == ("POST", "/apis/v2beta1/experiments")]
    assert experiments[0]["body"]["display_name"] == "nightly"
    assert not [r for r in kfp_api.requests if r["path"] == "/apis/v2beta1/runs"]  # scheduled, nothing started now

    cfg = PipelineConfig(ingest=IngestConfig(reviews=REVIEWS), train=TrainConfig(epochs=3))
    cluster = ClusterConfig(tracking_uri="http://mlflow.example:5000", service_account="bincounter-pipeline")
    params = job["runtime_config"]["parameters"]
    assert params == json.loads(json.dumps(arguments(for_cluster(cfg, cluster), cluster.tracking_uri, cluster)))
    assert params["ingest"]["reviews"] == REVIEWS
    spec = job["pipeline_spec"]["pipeline_spec"]
    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path / "expected.yaml", cfg, cluster).read_text()))
    assert spec == json.loads(json.dumps(docs[0]))
    assert job["pipeline_spec"]["platform_spec"] == json.loads(json.dumps(docs[1]))
    assert spec["root"]["inputDefinitions"]["parameters"]["ingest"]["defaultValue"]["reviews"] == REVIEWS
    # Every run reads the reviews written since the last one: ingest is never cached, whatever --cluster.cache-data.
    assert not _ingest_caching(spec).get("enableCache")

    out = json.loads(capsys.readouterr().out)  # stdout is the JSON alone (kfp's experiment link goes to stderr)
    assert out["recurring_run_id"] == "rr-1" and out["cron"] == "0 0 3 * * *"
    assert out["url"] == f"{kfp_api.url}/#/recurringrun/details/rr-1"


@pytest.mark.parametrize("shards", [1, 3])
def test_ingest_is_cached_without_reviews_and_never_with_them(tmp_path, shards):
    cluster = ClusterConfig()  # --cluster.cache-data on
    plain = yaml.safe_load(compile_pipeline(tmp_path / "plain.yaml", PipelineConfig(shards=shards), cluster)
                           .read_text().split("\n---\n")[0])
    assert _ingest_caching(plain) == {"enableCache": True}
    reviewed = PipelineConfig(shards=shards, ingest=IngestConfig(reviews=REVIEWS))
    spec = yaml.safe_load(compile_pipeline(tmp_path / "reviewed.yaml", reviewed, cluster).read_text()
                          .split("\n---\n")[0])
    assert not _ingest_caching(spec).get("enableCache")
    tasks = {}
    for component in [spec["root"], *spec["components"].values()]:
        tasks.update(component.get("dag", {}).get("tasks", {}))
    assert tasks["preprocess"]["cachingOptions"] == {"enableCache": True}  # only ingest reads the reviews


@pytest.mark.parametrize("cron", ["0 3 * *", "0 0 0 3 * * *", "@daily", "0 3 * * * ; rm"])
def test_schedule_refuses_what_is_not_a_cron_expression_before_calling_the_server(cron):
    with FakeKFP() as kfp_api:
        with pytest.raises(SystemExit, match="is not a cron expression: give 5 fields"):
            main(["pipeline", "schedule", "--host", kfp_api.url, "--cron", cron])
    assert not kfp_api.requests


def test_schedule_takes_kfps_six_fields_as_they_are(capsys):
    with FakeKFP() as kfp_api:
        main(["pipeline", "schedule", "--host", kfp_api.url, "--cron", "30 0 3 * * MON-FRI", "--job-name", "weekdays"])
        job = kfp_api.created_recurring_run()
    assert job["trigger"]["cron_schedule"]["cron"] == "30 0 3 * * MON-FRI" and job["display_name"] == "weekdays"


def test_schedule_refuses_a_second_recurring_run_of_the_same_name():
    existing = [{"recurring_run_id": "rr-0", "display_name": "bincounter-retrain"}]
    with FakeKFP(recurring_runs=existing) as kfp_api:
        with pytest.raises(SystemExit, match="already has a recurring run 'bincounter-retrain' \\(rr-0\\)"):
            main(["pipeline", "schedule", "--host", kfp_api.url, "--cron", "0 3 * * *"])
    assert not [r for r in kfp_api.requests if (r["method"], r["path"]) == ("POST", "/apis/v2beta1/recurringruns")]
    (listed,) = [r for r in kfp_api.requests if (r["method"], r["path"]) == ("GET", "/apis/v2beta1/recurringruns")]
    assert listed["query"]["experiment_id"] == ["exp-1"]


def test_schedule_refuses_a_server_older_than_the_backend_the_yaml_is_compiled_for():
    with FakeKFP(release="2.14.1") as kfp_api:
        with pytest.raises(SystemExit, match="runs 2.14.1, older than the 2.15"):
            main(["pipeline", "schedule", "--host", kfp_api.url, "--cron", "0 3 * * *"])
    assert not [r for r in kfp_api.requests if r["method"] == "POST"]
