"""Training on SageMaker through boto3: the request, the wait, the metrics, the model.

``training_job_request`` turns TrainConfig (as hyperparameters) and SageMakerConfig into a
CreateTrainingJob request for our own image, whose ``train`` entry point
(``bincounter.sagemaker.entry``) honours SageMaker's training contract. ``wait_for_training_job``
polls DescribeTrainingJob with a progress bar; ``final_metrics`` reads the metrics SageMaker
parsed from the job's log with ``METRIC_DEFINITIONS`` (FinalMetricDataList, no CloudWatch
needed); ``download_model`` unpacks model.tar.gz into a folder that evaluate and register
read like a local training output.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bincounter.config import SageMakerConfig, TrainConfig
from bincounter.sagemaker.entry import DATA_CHANNEL, METRIC_DEFINITIONS, to_hyperparameters

CONTAINER_CHECKPOINTS = "/opt/ml/checkpoints"
# The image's own entry point, spelled out so the job does not depend on the image's CMD.
CONTAINER_ENTRYPOINT = ("python", "-m", "bincounter.sagemaker.entry")
DONE = ("Completed", "Failed", "Stopped")


class TrainingJobFailed(RuntimeError):
    """The training job ended Failed or Stopped; the message carries SageMaker's FailureReason."""


def clients(sm: SageMakerConfig, session: Any = None) -> tuple[Any, Any]:
    """boto3 ``sagemaker`` and ``s3`` clients for ``sm``'s region and endpoint overrides."""
    if session is None:
        import boto3

        session = boto3.session.Session()
    return (session.client("sagemaker", region_name=sm.region, endpoint_url=sm.sagemaker_endpoint_url),
            session.client("s3", region_name=sm.region, endpoint_url=sm.s3_endpoint_url))


def job_name(sm: SageMakerConfig, key: str) -> str:
    """The job's name: the prefix and a digest of ``key`` (what makes this job this job).

    A step retried with the same key (same output folder, settings and data) finds its job again
    instead of paying for a second one; job names are unique per account and region forever.
    """
    return f"{sm.job_name_prefix}-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


def describe_training_job(client: Any, name: str) -> dict[str, Any] | None:
    """DescribeTrainingJob, or None when there is no job of that name."""
    try:
        return client.describe_training_job(TrainingJobName=name)
    except Exception as exc:  # botocore ClientError
        error = (getattr(exc, "response", None) or {}).get("Error", {})
        message = str(error.get("Message", "")).lower()
        if error.get("Code") == "ValidationException" and ("not find" in message or "not found" in message):
            return None
        raise


def dataset_digest(data_dir: str | Path) -> str:
    """Names a preprocess output by its dataset.json (which lists every shard and the input's hash)."""
    return hashlib.sha256((Path(data_dir) / "dataset.json").read_bytes()).hexdigest()[:16]


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def upload_dataset(data_dir: str | Path, s3_uri: str, s3: Any) -> str:
    """Copy a preprocess output to ``s3_uri`` (objects already there with the same size are
    kept, so a retried step uploads only what is missing); returns ``s3_uri``."""
    from tqdm import tqdm

    data_dir = Path(data_dir)
    if not (data_dir / "dataset.json").exists():
        raise FileNotFoundError(f"{data_dir} holds no dataset.json: not a preprocess output")
    bucket, prefix = _split_s3(s3_uri.rstrip("/"))
    present: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        present.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    files = sorted(p for p in data_dir.rglob("*") if p.is_file())
    # dataset.json last: a reader that sees it sees every shard it lists.
    files.sort(key=lambda p: p.name == "dataset.json")
    for path in tqdm(files, desc=f"upload to {s3_uri}", unit="file", leave=False):
        key = f"{prefix}/{path.relative_to(data_dir).as_posix()}"
        if present.get(key) != path.stat().st_size:
            s3.upload_file(str(path), bucket, key)
    return s3_uri.rstrip("/")


def training_job_request(train: TrainConfig, sm: SageMakerConfig, *, name: str, data_uri: str,
                         tags: dict[str, str] | None = None) -> dict[str, Any]:
    """The CreateTrainingJob request (boto3 spelling) for ``train`` on ``sm``'s account."""
    from bincounter.deploy.sagemaker import check_role_arn, ecr_region

    role = check_role_arn(sm.role_arn, "SageMakerConfig.role_arn")
    image_region = ecr_region(sm.training_image, "SageMakerConfig.training_image")
    if image_region != sm.region:
        raise ValueError(f"training_image is in {image_region}, the job in {sm.region}: SageMaker pulls "
                         "training images from its own region's ECR")
    if not data_uri.startswith("s3://"):
        raise ValueError(f"the training channel must be an s3:// prefix, not {data_uri!r}")
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": sm.max_run_seconds}
    if sm.spot:
        stopping["MaxWaitTimeInSeconds"] = sm.max_wait_seconds
    request: dict[str, Any] = {
        "TrainingJobName": name,
        "HyperParameters": to_hyperparameters(train),
        "AlgorithmSpecification": {
            "TrainingImage": sm.training_image,
            "TrainingInputMode": "File",
            "MetricDefinitions": [dict(d) for d in METRIC_DEFINITIONS],
            "ContainerEntrypoint": list(CONTAINER_ENTRYPOINT),
            "ContainerArguments": ["train"],
        },
        "RoleArn": role,
        "InputDataConfig": [{
            "ChannelName": DATA_CHANNEL,
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": data_uri.rstrip("/") + "/",
                                            "S3DataDistributionType": "FullyReplicated"}},
            "InputMode": "File",
        }],
        "OutputDataConfig": {"S3OutputPath": sm.s3_uri(sm.output_prefix)},
        "ResourceConfig": {"InstanceType": sm.instance_type, "InstanceCount": sm.instance_count,
                           "VolumeSizeInGB": sm.volume_gb},
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": sm.spot,
        # Per job: a spot restart of this job finds its own checkpoints, never another job's.
        "CheckpointConfig": {"S3Uri": sm.s3_uri(sm.checkpoint_prefix, name), "LocalPath": CONTAINER_CHECKPOINTS},
        "Tags": [{"Key": k, "Value": v} for k, v in {"app": "bincounter", **(tags or {})}.items()],
    }
    return request


def wait_for_training_job(client: Any, name: str, *, poll_seconds: float = 30.0, timeout: float | None = None,
                          progress: bool = True) -> dict[str, Any]:
    """Poll DescribeTrainingJob until the job ends; its last description.

    Shows the secondary status (Starting, Downloading, Training, Interrupted, Uploading...) as it
    changes. Raises TrainingJobFailed with SageMaker's FailureReason if it ends Failed or Stopped.
    """
    from tqdm import tqdm

    deadline = None if timeout is None else time.monotonic() + timeout
    seen = 0
    with tqdm(desc=f"training job {name}", unit="poll", disable=not progress) as bar:
        while True:
            described = client.describe_training_job(TrainingJobName=name)
            transitions = described.get("SecondaryStatusTransitions", [])
            for t in transitions[seen:]:
                bar.write(f"{name}: {t['Status']} - {t.get('StatusMessage', '')}")
            seen = len(transitions)
            status = described["TrainingJobStatus"]
            bar.set_postfix(status=status, detail=described.get("SecondaryStatus"))
            bar.update()
            if status in DONE:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"training job {name} is still {status} after {timeout:.0f} s "
                                   "(it keeps running: stop it in the console or with StopTrainingJob)")
            time.sleep(poll_seconds)
    if status != "Completed":
        raise TrainingJobFailed(f"training job {name} ended {status}: "
                                f"{described.get('FailureReason', 'no reason given')}")
    return described


def final_metrics(described: dict[str, Any]) -> dict[str, float]:
    """The job's last value of each metric definition (FinalMetricDataList), MLflow-safe names."""
    return {re.sub(r"[^\w./ -]", "_", m["MetricName"]): float(m["Value"])
            for m in described.get("FinalMetricDataList", [])}


def billing(described: dict[str, Any]) -> dict[str, float]:
    """Seconds trained and billed; with spot, the saving SageMaker reports (1 - billable/trained)."""
    trained = float(described.get("TrainingTimeInSeconds") or 0)
    billable = float(described.get("BillableTimeInSeconds") or trained)
    out = {"sagemaker_training_seconds": trained, "sagemaker_billable_seconds": billable}
    if trained:
        out["sagemaker_spot_saving"] = 1.0 - billable / trained
    return out


def download_model(s3_uri: str, out_dir: str | Path, s3: Any) -> Path:
    """Unpack the job's model.tar.gz into ``out_dir`` (no member may leave it, no links)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bucket, key = _split_s3(s3_uri)
    with tempfile.TemporaryDirectory(prefix="bincounter-model-") as tmp:
        archive = Path(tmp) / "model.tar.gz"
        s3.download_file(bucket, key, str(archive))
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(out_dir, filter="data")  # refuses absolute paths, "..", devices, outside links
    if not (out_dir / "model.pt").exists() or not (out_dir / "model_spec.json").exists():
        raise FileNotFoundError(f"{s3_uri} holds no model.pt and model_spec.json: not a bincounter model")
    return out_dir
