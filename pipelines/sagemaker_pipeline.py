"""The SageMaker variant: ingest -> preprocess on the cluster, training as a SageMaker job,
evaluate -> register on the job's model artifact, hosting on a SageMaker endpoint.

Wiring only. The pipeline's own pods request no GPU: the training job brings its instance.
The account's settings are pipeline parameters whose defaults are ``SageMakerConfig``'s; the
training settings are one struct parameter, ``train`` (``TrainConfig`` as JSON).
"""

from kfp import dsl

from bincounter.config import EvaluateConfig, IngestConfig, PreprocessConfig, RegisterConfig, SageMakerConfig, TrainConfig
from components.evaluate import evaluate
from components.ingest import ingest
from components.preprocess import preprocess
from components.register import register
from components.sagemaker_deploy import sagemaker_deploy
from components.sagemaker_train import sagemaker_train

_SM = SageMakerConfig()
_INGEST, _PRE, _EVAL, _REG = IngestConfig(), PreprocessConfig(), EvaluateConfig(), RegisterConfig()


def make_pipeline():
    """Build the SageMaker variant of the bincounter pipeline."""

    @dsl.pipeline(name="bincounter-sagemaker",
                  description="Count items in warehouse bin photos; training and hosting on Amazon SageMaker.")
    def bincounter_sagemaker_pipeline(
        role_arn: str,
        bucket: str,
        training_image: str,
        serving_image: str,
        region: str = _SM.region,
        data_prefix: str = _SM.data_prefix,
        output_prefix: str = _SM.output_prefix,
        checkpoint_prefix: str = _SM.checkpoint_prefix,
        instance_type: str = _SM.instance_type,
        volume_gb: int = _SM.volume_gb,
        spot: bool = _SM.spot,
        max_run_seconds: int = _SM.max_run_seconds,
        max_wait_seconds: int = _SM.max_wait_seconds,
        endpoint_name: str = _SM.endpoint_name,
        endpoint_instance_type: str = _SM.endpoint_instance_type,
        endpoint_instance_count: int = _SM.endpoint_instance_count,
        train: dict = TrainConfig().model_dump(mode="json", exclude_none=True),  # protobuf structs hold no None
        source_uri: str = _INGEST.source.uri,
        endpoint_url: str = "",
        anonymous: bool = _INGEST.source.anonymous,
        file_list: str = "",
        limit: int = 0,
        per_class: int = 0,
        ingest_workers: int = _INGEST.workers,
        image_size: int = _PRE.image_size,
        min_count: int = _PRE.min_count,
        max_count: int = _PRE.max_count,
        overflow: str = _PRE.overflow,
        val_fraction: float = _PRE.val_fraction,
        test_fraction: float = _PRE.test_fraction,
        eval_batch_size: int = _EVAL.batch_size,
        model_name: str = _REG.model_name,
        promotion_metric: str = _REG.metric,
        min_improvement: float = _REG.min_improvement,
        deploy_enabled: bool = True,
        deploy_model_uri: str = "",
        tracking_uri: str = "",
        experiment: str = _REG.experiment,
    ):
        # One source for the account's settings in both SageMaker steps.
        account = {
            "region": region, "role_arn": role_arn, "bucket": bucket, "data_prefix": data_prefix,
            "output_prefix": output_prefix, "checkpoint_prefix": checkpoint_prefix,
            "training_image": training_image, "serving_image": serving_image, "instance_type": instance_type,
            "volume_gb": volume_gb, "spot": spot, "max_run_seconds": max_run_seconds,
            "max_wait_seconds": max_wait_seconds, "endpoint_name": endpoint_name,
            "endpoint_instance_type": endpoint_instance_type, "endpoint_instance_count": endpoint_instance_count,
        }
        raw = ingest(source_uri=source_uri, endpoint_url=endpoint_url, anonymous=anonymous, file_list=file_list,
                     limit=limit, per_class=per_class, workers=ingest_workers)
        data = preprocess(raw=raw.outputs["raw"], image_size=image_size, min_count=min_count, max_count=max_count,
                          overflow=overflow, val_fraction=val_fraction, test_fraction=test_fraction)
        trained = sagemaker_train(data=data.outputs["data"], config={
            "train": train, "sagemaker": account, "tracking_uri": tracking_uri, "experiment": experiment})
        # It only uploads, polls and downloads; the job's instance does the training.
        trained.set_cpu_request("500m").set_memory_request("2G")
        scored = evaluate(model=trained.outputs["model"], data=data.outputs["data"], batch_size=eval_batch_size,
                          tracking_uri=tracking_uri, experiment=experiment)
        registered = register(model=trained.outputs["model"], results=scored.outputs["results"],
                              data=data.outputs["data"], model_name=model_name, metric=promotion_metric,
                              min_improvement=min_improvement, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                              tracking_uri=tracking_uri, experiment=experiment)
        # Registering and deploying change the world outside the pipeline: never cache them.
        registered.set_caching_options(False)
        with dsl.If(deploy_enabled == True):  # noqa: E712 - kfp builds a condition from ==
            served = sagemaker_deploy(registration=registered.outputs["registration"], config={
                "sagemaker": account, "model_uri": deploy_model_uri, "tracking_uri": tracking_uri})
            served.set_caching_options(False)

    return bincounter_sagemaker_pipeline


def compile_pipeline(path):
    """Compile the SageMaker variant to ``path`` (YAML); returns the path."""
    from pathlib import Path

    from kfp import compiler

    compiler.Compiler().compile(make_pipeline(), str(path))
    return Path(path)
