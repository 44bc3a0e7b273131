"""The SageMaker pipeline's two steps, as the KFP components (or a script) call them.

``train``: upload the packed shards to S3, run a SageMaker training job on them, record it in
an MLflow run (parameters, the per-epoch history the job wrote, its final metrics and billed
seconds) and unpack its model.tar.gz where evaluate and register expect a training output.
``deploy``: host a registered model on a SageMaker endpoint (create or update, wait until
InService, roll back a failed update). No kfp import here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bincounter import tracking
from bincounter.config import DeployConfig, SageMakerHostingConfig, SageMakerTrainingConfig

log = logging.getLogger(__name__)


def train(cfg: SageMakerTrainingConfig, data_dir: str | Path, model_dir: str | Path, *, session: Any = None,
          curves_html: str | None = None, progress: bool = True) -> dict:
    """Train ``cfg.train`` as a SageMaker job on the preprocess output ``data_dir``; the model
    lands in ``model_dir``. Returns the artifact metadata (scalars only)."""
    from bincounter.data.preprocess import dataset_params, load_dataset_info
    from bincounter.sagemaker.jobs import (
        billing, clients, dataset_digest, describe_training_job, download_model, final_metrics, job_name,
        training_job_request, upload_dataset, wait_for_training_job,
    )

    sm = cfg.sagemaker
    model_dir = Path(model_dir)
    sagemaker, s3 = clients(sm, session)
    data_uri = sm.s3_uri(sm.data_prefix, dataset_digest(data_dir))
    # KFP gives a retried step the same output path: the retry finds the job its first attempt started.
    name = job_name(sm, json.dumps({"out": str(model_dir.resolve()), "data": data_uri,
                                    "train": cfg.train.model_dump(mode="json"),
                                    "sagemaker": sm.model_dump(mode="json")}, sort_keys=True))
    # Built before anything is uploaded, so a bad role or image fails in a second, not after the upload.
    request = training_job_request(cfg.train, sm, name=name, data_uri=data_uri)
    upload_dataset(data_dir, data_uri, s3)
    params = {**cfg.train.flat("train."), **sm.flat("sagemaker."),
              **dataset_params(load_dataset_info(data_dir)), "sagemaker.training_job_name": name,
              "sagemaker.data_uri": data_uri}
    with tracking.stage_run("train", params, tracking_uri=cfg.tracking_uri, experiment=cfg.experiment) as run:
        import mlflow

        existing = describe_training_job(sagemaker, name)
        if existing is None:
            arn = sagemaker.create_training_job(**request)["TrainingJobArn"]
        else:
            arn = existing["TrainingJobArn"]
            log.info("training job %s exists (%s): following it instead of starting another",
                     name, existing["TrainingJobStatus"])
        mlflow.set_tag("sagemaker.training_job_arn", arn)
        limit = (sm.max_wait_seconds if sm.spot else sm.max_run_seconds) + 3600  # plus start-up and upload
        described = wait_for_training_job(sagemaker, name, poll_seconds=sm.poll_seconds, timeout=limit,
                                          progress=progress)
        model_data = described["ModelArtifacts"]["S3ModelArtifacts"]
        download_model(model_data, model_dir, s3)
        history = json.loads((model_dir / "history.json").read_text()) if (model_dir / "history.json").exists() else []
        for row in history:  # the same per-epoch metrics a local training run logs
            tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        finals = final_metrics(described)
        tracking.log_metrics({f"final_{k}": v for k, v in finals.items()})
        costs = billing(described)
        tracking.log_metrics(costs)
        tracking.log_artifacts([model_dir / "plots"], "plots")
        mlflow.set_tag("sagemaker.model_data", model_data)
        (model_dir / "mlflow_run_id").write_text(run.info.run_id)
    best = max(history, key=lambda r: (r["val_accuracy"], -r["val_rmse"])) if history else {}
    if curves_html:
        from bincounter.reporting import html_page

        pngs = sorted((model_dir / "plots").glob("*.png"))
        Path(curves_html).write_text(html_page("Training on SageMaker", [
            f"job {name}: best epoch {best.get('epoch', '?')}: val accuracy {best.get('val_accuracy', 0):.4f}, "
            f"val RMSE {best.get('val_rmse', 0):.4f}; {costs['sagemaker_billable_seconds']:.0f} s billed"], pngs))
    return {"mlflow_run_id": run.info.run_id, "training_job_name": name, "training_job_arn": arn,
            "model_data": model_data, "data_uri": data_uri, "best_epoch": int(best.get("epoch", 0)),
            "val_accuracy": float(best.get("val_accuracy", 0.0)), "val_rmse": float(best.get("val_rmse", 0.0)),
            "backbone": cfg.train.backbone, "image_size": cfg.train.image_size, **costs}


def deploy_config(cfg: SageMakerHostingConfig, champion_uri: str) -> DeployConfig:
    """The sagemaker target's DeployConfig, from the SageMaker settings (their one source here)."""
    from bincounter.deploy.sagemaker import SageMakerConfigError

    sm = cfg.sagemaker
    if not sm.serving_image:
        raise SageMakerConfigError("SageMakerConfig.serving_image is not set: the ECR URI of the serving image")
    return DeployConfig(target="sagemaker", model_uri=cfg.model_uri or champion_uri, image=sm.serving_image,
                        sagemaker_role_arn=sm.role_arn, sagemaker_instance_type=sm.endpoint_instance_type,
                        replicas=sm.endpoint_instance_count)


def endpoint_network_and_secrets(sm) -> dict:
    """The endpoint's VPC config and the ARN of its MLflow credentials, from ``SageMakerConfig``
    (``bincounter.deploy.sagemaker.deploy``'s keyword arguments)."""
    from bincounter.serving.credentials import ARN_VARIABLE

    kwargs: dict = {}
    if sm.endpoint_subnets:
        kwargs["vpc_config"] = {"Subnets": list(sm.endpoint_subnets),
                                "SecurityGroupIds": list(sm.endpoint_security_groups)}
    if sm.mlflow_secret_arn:
        kwargs["environment"] = {ARN_VARIABLE: sm.mlflow_secret_arn}
    return kwargs


def deploy(cfg: SageMakerHostingConfig, champion_uri: str, *, session: Any = None, progress: bool = True) -> dict:
    """Create or update ``cfg.sagemaker.endpoint_name`` with the model ``cfg.model_uri`` (default
    ``champion_uri``); raises EndpointUpdateFailed after rolling a failed update back."""
    from bincounter.deploy import sagemaker as target
    from bincounter.sagemaker.jobs import clients

    from mlflow import MlflowClient

    from bincounter.registry.versions import pin

    sm = cfg.sagemaker
    sagemaker, _ = clients(sm, session)
    deploy_cfg = deploy_config(cfg, champion_uri)
    # The endpoint's model names the version the alias points to now: an update or a rollback
    # of the endpoint never loads another one.
    pinned = pin(deploy_cfg.model_uri, MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri))
    result = target.deploy(deploy_cfg.model_copy(update={"model_uri": pinned.uri}), endpoint_name=sm.endpoint_name,
                           tracking_uri=cfg.tracking_uri, region=sm.region, backend="boto3", client=sagemaker,
                           timeout=cfg.timeout_seconds, poll_seconds=sm.poll_seconds, progress=progress,
                           tags=pinned.labels(), deployment_config=target.guardrails(
                               sm.canary_percent, wait_seconds=sm.canary_wait_seconds, alarms=sm.rollback_alarms,
                               timeout=cfg.timeout_seconds),
                           **endpoint_network_and_secrets(sm))
    return {k: v for k, v in result.items() if isinstance(v, (str, int, float, bool))}
