"""SageMaker training jobs and the two SageMaker pipeline steps.

Requests are checked against botocore's own SageMaker service model. The whole flow runs
against moto's SageMaker and S3 in server mode on loopback; moto completes a training job the
moment it is created without running anything, so a botocore event hook plays SageMaker's part:
it lays out a temporary /opt/ml from the very request (hyperparameters, the S3 channel), runs
our ``train`` entry point in a process of its own, and uploads model.tar.gz and the checkpoints
where SageMaker would.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import boto3
import botocore.session
import pytest
from botocore.validate import ParamValidator

from bincounter.sagemaker import entry
from bincounter.sagemaker import jobs
from bincounter.sagemaker import steps
from bincounter.config import SageMakerConfig, SageMakerHostingConfig, SageMakerTrainingConfig, TrainConfig
from bincounter.deploy.sagemaker import SageMakerConfigError

SRC = Path(__file__).resolve().parents[2] / "src"
ROLE = "arn:aws:iam::123456789012:role/bincounter-sagemaker"
TRAIN_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/bincounter:0.1.0-cuda"
SERVE_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/bincounter:0.1.0"
API = botocore.session.get_session().get_service_model("sagemaker")
TINY = TrainConfig(backbone="tiny_cnn", pretrained="none", image_size=64, epochs=2, batch_size=32, lr=3e-3,
                   workers=0, freeze_early=0, progress=False, tta=False, ema_decay=0.0)


def sm_config(**overrides) -> SageMakerConfig:
    values = dict(role_arn=ROLE, bucket="bincounter-test", training_image=TRAIN_IMAGE, serving_image=SERVE_IMAGE,
                  poll_seconds=0.01)
    values.update(overrides)
    return SageMakerConfig(**values)


def assert_valid(operation: str, params: dict) -> None:
    report = ParamValidator().validate(params, API.operation_model(operation).input_shape)
    assert not report.has_errors(), report.generate_report()


@pytest.fixture(autouse=True)
def _offline_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


# --------------------------------------------------------------------------- the request


@pytest.mark.parametrize(("spot", "instances"), [(True, 1), (False, 1), (True, 4)])
def test_training_job_request_satisfies_the_api_model(spot: bool, instances: int) -> None:
    sm = sm_config(spot=spot, max_run_seconds=3600, max_wait_seconds=7200, instance_count=instances)
    request = jobs.training_job_request(TINY, sm, name="bincounter-1", data_uri="s3://bincounter-test/d/abc")
    assert_valid("CreateTrainingJob", request)
    assert request["EnableManagedSpotTraining"] is spot
    assert request["ResourceConfig"]["InstanceCount"] == instances  # spot with several instances is allowed
    # Every instance reads the whole channel: each rank's DistributedSampler takes its own share.
    assert request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3DataDistributionType"] == "FullyReplicated"
    assert request["StoppingCondition"] == ({"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200} if spot
                                            else {"MaxRuntimeInSeconds": 3600})
    assert request["CheckpointConfig"] == {"S3Uri": "s3://bincounter-test/bincounter/checkpoints/bincounter-1",
                                           "LocalPath": "/opt/ml/checkpoints"}
    assert request["InputDataConfig"][0]["ChannelName"] == entry.DATA_CHANNEL
    assert request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://bincounter-test/d/abc/"
    assert request["OutputDataConfig"] == {"S3OutputPath": "s3://bincounter-test/bincounter/jobs"}
    assert request["AlgorithmSpecification"]["MetricDefinitions"] == [dict(d) for d in entry.METRIC_DEFINITIONS]
    assert request["AlgorithmSpecification"]["ContainerArguments"] == ["train"]
    # The hyperparameters are TrainConfig, and the entry point reads them back as the same config.
    assert entry.parse_hyperparameters(request["HyperParameters"]) == TINY


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(role_arn=None), "role_arn"),
        (dict(role_arn="admin"), "not an IAM role ARN"),
        (dict(training_image="ghcr.io/bincounter/bincounter:0.1.0"), "only from Amazon ECR"),
        (dict(region="eu-west-1"), "pulls training images from its own region"),
        (dict(bucket=None), "bucket is not set"),
    ],
)
def test_request_errors_say_what_to_set(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        jobs.training_job_request(TINY, sm_config(**overrides), name="j", data_uri="s3://b/d")


def test_config_takes_what_a_run_form_gives_and_refuses_the_rest() -> None:
    """A KFP run argument cannot be null: "" stands for unset; numbers and booleans may come as text."""
    sm = SageMakerConfig.model_validate({"role_arn": ROLE, "bucket": "b", "training_image": "", "spot": "false",
                                         "volume_gb": "50", "instance_count": "2"})
    assert sm.training_image is None and sm.spot is False and sm.volume_gb == 50 and sm.instance_count == 2
    with pytest.raises(ValueError, match="extra"):
        SageMakerConfig.model_validate({"rolearn": ROLE})
    with pytest.raises(ValueError, match="instance_count"):
        SageMakerConfig(instance_count=0)


def test_config_rejects_a_spot_wait_shorter_than_the_run() -> None:
    with pytest.raises(ValueError, match="max_wait_seconds"):
        SageMakerConfig(spot=True, max_run_seconds=7200, max_wait_seconds=3600)
    SageMakerConfig(spot=False, max_run_seconds=7200, max_wait_seconds=3600)  # no wait without spot


# --------------------------------------------------------------------------- waiting and results


def _job(status: str, secondary: str, transitions: int, **extra) -> dict:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    steps = [("Starting", "Preparing the instances for training"), ("Downloading", "Downloading input data"),
             ("Training", "Training image download completed. Training in progress.")]
    return {
        "TrainingJobName": "bincounter-1",
        "TrainingJobArn": "arn:aws:sagemaker:us-east-1:123456789012:training-job/bincounter-1",
        "ModelArtifacts": {"S3ModelArtifacts": "s3://b/bincounter/jobs/bincounter-1/output/model.tar.gz"},
        "TrainingJobStatus": status, "SecondaryStatus": secondary,
        "AlgorithmSpecification": {"TrainingImage": TRAIN_IMAGE, "TrainingInputMode": "File"},
        "ResourceConfig": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600}, "CreationTime": now,
        "SecondaryStatusTransitions": [{"Status": s, "StartTime": now, "StatusMessage": m} for s, m in steps[:transitions]],
        **extra,
    }


def test_waiting_follows_the_job_to_completion(sagemaker_stub, capsys) -> None:
    client, stubber = sagemaker_stub
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    stubber.add_response("describe_training_job", _job("InProgress", "Starting", 1), {"TrainingJobName": "bincounter-1"})
    stubber.add_response("describe_training_job", _job("InProgress", "Training", 3), {"TrainingJobName": "bincounter-1"})
    done = _job("Completed", "Completed", 3, TrainingTimeInSeconds=1000, BillableTimeInSeconds=300,
                FinalMetricDataList=[{"MetricName": "val_accuracy", "Value": 0.75, "Timestamp": now},
                                     {"MetricName": "train:progress", "Value": 100.0, "Timestamp": now}])
    stubber.add_response("describe_training_job", done, {"TrainingJobName": "bincounter-1"})

    described = jobs.wait_for_training_job(client, "bincounter-1", poll_seconds=0.01, progress=True)

    out = capsys.readouterr().out
    assert out.count("bincounter-1: Starting") == 1 and "bincounter-1: Training - Training image" in out
    assert jobs.final_metrics(described) == {"val_accuracy": 0.75, "train_progress": 100.0}
    assert jobs.billing(described) == {"sagemaker_training_seconds": 1000.0, "sagemaker_billable_seconds": 300.0,
                                       "sagemaker_spot_saving": 0.7}


def test_a_failed_job_raises_its_failure_reason(sagemaker_stub) -> None:
    client, stubber = sagemaker_stub
    failed = _job("Failed", "Failed", 3, FailureReason="AlgorithmError: FileNotFoundError: input channel 'training'")
    stubber.add_response("describe_training_job", failed, {"TrainingJobName": "bincounter-1"})
    with pytest.raises(jobs.TrainingJobFailed, match="ended Failed: AlgorithmError: FileNotFoundError"):
        jobs.wait_for_training_job(client, "bincounter-1", poll_seconds=0.01, progress=False)


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _FakeS3:
    """download_file only: what download_model asks of S3."""

    def __init__(self, data: bytes):
        self.data = data

    def download_file(self, bucket: str, key: str, path: str) -> None:
        Path(path).write_bytes(self.data)


def test_download_model_refuses_members_outside_the_folder(tmp_path: Path) -> None:
    s3 = _FakeS3(_tar({"model.pt": b"x", "model_spec.json": b"{}", "../escaped": b"owned"}))
    with pytest.raises(tarfile.OutsideDestinationError):
        jobs.download_model("s3://b/model.tar.gz", tmp_path / "model", s3)
    assert not (tmp_path / "escaped").exists()


def test_download_model_refuses_an_archive_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a bincounter model"):
        jobs.download_model("s3://b/model.tar.gz", tmp_path / "model", _FakeS3(_tar({"notes.txt": b"hi"})))


# --------------------------------------------------------------------------- the whole flow on moto


@pytest.fixture
def moto_url():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(url + "/moto-api/reset", method="POST"), timeout=10)
        yield url
    finally:
        server.stop()


class FakeSageMakerRuntime:
    """Plays SageMaker's part for a job moto accepted: run our image's entry point on the request."""

    def __init__(self, session: boto3.session.Session, url: str, work: Path):
        self.s3 = session.client("s3", region_name="us-east-1", endpoint_url=url)
        self.work = work
        self.sent: list[tuple[str, dict]] = []
        self.ran: list[str] = []
        session.events.register("before-parameter-build.sagemaker", self.record)
        session.events.register("after-call.sagemaker.CreateTrainingJob", self.run_job)

    def record(self, params: dict, model, **_) -> None:
        self.sent.append((model.name, json.loads(json.dumps(params, default=str))))

    def run_job(self, **_) -> None:
        request = next(p for op, p in reversed(self.sent) if op == "CreateTrainingJob")
        name = request["TrainingJobName"]
        layout = entry.Layout(self.work / name)
        layout.hyperparameters.parent.mkdir(parents=True)
        layout.hyperparameters.write_text(json.dumps(request["HyperParameters"]))
        channel = request["InputDataConfig"][0]
        source = channel["DataSource"]["S3DataSource"]["S3Uri"]
        bucket, prefix = source[len("s3://"):].split("/", 1)
        for obj in self.s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
            dest = layout.channel(channel["ChannelName"]) / obj["Key"][len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(bucket, obj["Key"], str(dest))
        env = {**os.environ, entry.ROOT_ENV: str(layout.root), "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
        env.pop("MLFLOW_TRACKING_URI")  # the container has no MLflow of its own
        proc = subprocess.run([sys.executable, "-m", "bincounter.sagemaker.entry", *request["AlgorithmSpecification"]
                               ["ContainerArguments"]], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr + (layout.failure.read_text() if layout.failure.exists() else "")
        self.ran.append(proc.stdout)
        # What SageMaker does after the container exits: tar model/, sync checkpoints/.
        archive = self.work / f"{name}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(layout.model.iterdir()):
                tar.add(path, arcname=path.name)
        out_bucket, out_prefix = request["OutputDataConfig"]["S3OutputPath"][len("s3://"):].split("/", 1)
        self.s3.upload_file(str(archive), out_bucket, f"{out_prefix}/{name}/output/model.tar.gz")
        ck_bucket, ck_prefix = request["CheckpointConfig"]["S3Uri"][len("s3://"):].split("/", 1)
        for path in layout.checkpoints.iterdir():
            self.s3.upload_file(str(path), ck_bucket, f"{ck_prefix}/{path.name}")


@pytest.mark.slow
def test_the_pipeline_steps_run_against_sagemaker_on_moto(moto_url: str, data_dir: Path, tmp_path: Path) -> None:
    import mlflow

    session = boto3.session.Session(region_name="us-east-1")
    runtime = FakeSageMakerRuntime(session, moto_url, tmp_path / "sagemaker")
    runtime.s3.create_bucket(Bucket="bincounter-test")
    sm = sm_config(sagemaker_endpoint_url=moto_url, s3_endpoint_url=moto_url)

    # Training: shards up to S3, the job created and polled to completion, its model unpacked.
    cfg = SageMakerTrainingConfig(train=TINY, sagemaker=sm, experiment="sagemaker-test")
    model_dir = tmp_path / "model"
    meta = steps.train(cfg, data_dir, model_dir, session=session, curves_html=str(tmp_path / "c.html"),
                                  progress=False)

    assert len(runtime.ran) == 1
    assert entry.parse_hyperparameters(next(p for op, p in runtime.sent if op == "CreateTrainingJob")
                                       ["HyperParameters"]) == TINY
    name = meta["training_job_name"]
    keys = {o["Key"] for o in runtime.s3.list_objects_v2(Bucket="bincounter-test")["Contents"]}
    assert f"bincounter/data/{jobs.dataset_digest(data_dir)}/dataset.json" in keys
    assert f"bincounter/checkpoints/{name}/checkpoint.pt" in keys
    assert meta["model_data"] == f"s3://bincounter-test/bincounter/jobs/{name}/output/model.tar.gz"
    assert (model_dir / "model.pt").exists() and (model_dir / "mlflow_run_id").read_text() == meta["mlflow_run_id"]
    assert meta["best_epoch"] in (1, 2) and "training_job_arn" in meta
    assert "Training on SageMaker" in (tmp_path / "c.html").read_text()

    # A retried step (same output folder, settings and data) follows the job it started: no second job.
    again = steps.train(cfg, data_dir, model_dir, session=session, progress=False)
    assert again["training_job_name"] == name and len(runtime.ran) == 1
    assert [op for op, _ in runtime.sent].count("CreateTrainingJob") == 1

    client = mlflow.tracking.MlflowClient()
    run = client.get_run(meta["mlflow_run_id"])
    assert run.data.params["train.backbone"] == "tiny_cnn"
    assert run.data.params["sagemaker.instance_type"] == "ml.g5.xlarge"
    assert run.data.params["sagemaker.training_job_name"] == name
    assert run.data.tags["sagemaker.training_job_arn"].endswith(f"training-job/{name}")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
    assert "final_train_progress" in run.data.metrics  # moto's FinalMetricDataList, name made MLflow-safe
    assert "sagemaker_billable_seconds" in run.data.metrics

    # Evaluate and register read the unpacked artifact like a local training folder.
    from bincounter import launch
    from bincounter.config import EvaluateConfig

    scored = launch.evaluate(EvaluateConfig(batch_size=64, latency_samples=0), str(model_dir), str(data_dir),
                             str(tmp_path / "eval"), experiment="sagemaker-test", run_id=meta["mlflow_run_id"])
    assert 0.0 <= scored["summary"]["accuracy"] <= 1.0
    from bincounter.config import RegisterConfig

    registered = launch.register(RegisterConfig(experiment="sagemaker-test"), str(model_dir), str(tmp_path / "eval"),
                                 str(data_dir), run_id=meta["mlflow_run_id"])
    assert registered["promoted"] and registered["champion_uri"] == "models:/bincounter@champion"

    # Hosting: model, endpoint config and endpoint created, waited for until InService.
    hosting = SageMakerHostingConfig(sagemaker=sm, tracking_uri="https://mlflow.example.com")
    local = mlflow.tracking.MlflowClient()
    with pytest.MonkeyPatch.context() as mp:
        # The endpoint's tracking server, where the step pins the champion, is this test's store.
        mp.setattr(mlflow, "MlflowClient", lambda **_: local)
        served = steps.deploy(hosting, registered["champion_uri"], session=session, progress=False)
    assert (served["operation"], served["status"], served["backend"]) == ("create", "InService", "boto3")
    api = session.client("sagemaker", region_name="us-east-1", endpoint_url=moto_url)
    endpoint = api.describe_endpoint(EndpointName="bincounter")
    assert endpoint["EndpointConfigName"] == served["endpoint_config_name"]
    container = api.describe_model(ModelName=served["model_name"])["PrimaryContainer"]
    assert container["Image"] == SERVE_IMAGE
    # The endpoint is pinned to the version the alias named at deploy time, not the moving alias.
    champion = mlflow.tracking.MlflowClient().get_model_version_by_alias("bincounter", "champion")
    assert container["Environment"]["MODEL_URI"] == f"models:/bincounter/{champion.version}"

    # Every request that went out satisfies SageMaker's API model.
    operations = [op for op, _ in runtime.sent]
    for op in ("CreateTrainingJob", "DescribeTrainingJob", "CreateModel", "CreateEndpointConfig", "DescribeEndpoint",
               "CreateEndpoint"):
        assert op in operations
    for op, params in runtime.sent:
        assert_valid(op, params)


def test_hosting_needs_a_serving_image() -> None:
    with pytest.raises(SageMakerConfigError, match="serving_image"):
        steps.deploy_config(SageMakerHostingConfig(sagemaker=sm_config(serving_image="")), "models:/m@champion")


def test_describe_tells_a_missing_job_from_other_errors(sagemaker_stub) -> None:
    from botocore.exceptions import ClientError

    client, stubber = sagemaker_stub
    stubber.add_client_error("describe_training_job", service_error_code="ValidationException",
                             service_message="Requested resource not found.", expected_params={"TrainingJobName": "j"})
    stubber.add_client_error("describe_training_job", service_error_code="AccessDeniedException",
                             service_message="not allowed", expected_params={"TrainingJobName": "j"})
    assert jobs.describe_training_job(client, "j") is None
    with pytest.raises(ClientError, match="AccessDenied"):
        jobs.describe_training_job(client, "j")


def test_job_names_are_valid_and_follow_their_key() -> None:
    sm = sm_config()
    name = jobs.job_name(sm, "key")
    assert name == jobs.job_name(sm, "key") != jobs.job_name(sm, "other key")
    assert re.fullmatch(API.shape_for("TrainingJobName").metadata["pattern"], name) and len(name) <= 63
