"""The SageMaker variant: ingest -> preprocess on the cluster, training as a SageMaker job,
evaluate -> register on the job's model artifact, hosting on a SageMaker endpoint.

Wiring only. The pipeline's own pods request no GPU: the training job brings its instance.
The account's settings are pipeline parameters whose defaults are ``SageMakerConfig``'s; the
training settings are one struct parameter, ``train`` (``TrainConfig`` as JSON).
"""

from typing import Optional

from kfp import dsl

from bincounter.config import PipelineConfig, SageMakerConfig
from components.evaluate import evaluate as evaluate_op
from components.register import register as register_op
from components.sagemaker_deploy import sagemaker_deploy
from components.sagemaker_train import sagemaker_train
from pipelines.bincounter_pipeline import data_stages

_SM = SageMakerConfig()


def make_pipeline(defaults: Optional[PipelineConfig] = None):
    """Build the SageMaker variant of the bincounter pipeline; the stages' struct parameters
    default to ``defaults`` (as in the main pipeline)."""
    d = defaults or PipelineConfig()

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
        ingest: dict = d.ingest.params(),
        preprocess: dict = d.preprocess.params(),
        train: dict = d.train.params(),
        evaluate: dict = d.evaluate.params(),
        registry: dict = d.registry.params(),
        shards: int = d.shards,
        deploy_enabled: bool = d.deploy_enabled,
        deploy_model_uri: str = "",
        tracking_uri: str = "",
        experiment: str = d.registry.experiment,
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
        stages = data_stages(ingest, preprocess, shards)
        data = stages["merge_shards"]
        trained = sagemaker_train(data=data.outputs["data"], config={
            "train": train, "sagemaker": account, "tracking_uri": tracking_uri, "experiment": experiment})
        # It only uploads, polls and downloads; the job's instance does the training.
        trained.set_cpu_request("500m").set_memory_request("2G")
        # The original photos too: evaluation scores them as the server answers them.
        scored = evaluate_op(model=trained.outputs["model"], data=data.outputs["data"],
                             originals=dsl.Collected(stages["ingest"].outputs["raw"]), config=evaluate,
                             tracking_uri=tracking_uri, experiment=experiment)
        registered = register_op(model=trained.outputs["model"], results=scored.outputs["results"],
                                 data=data.outputs["data"], config=registry,
                                 pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, tracking_uri=tracking_uri)
        # Registering and deploying change the world outside the pipeline: never cache them.
        registered.set_caching_options(False)
        with dsl.If(deploy_enabled == True):  # noqa: E712 - kfp builds a condition from ==
            served = sagemaker_deploy(registration=registered.outputs["registration"], config={
                "sagemaker": account, "model_uri": deploy_model_uri, "tracking_uri": tracking_uri})
            served.set_caching_options(False)

    return bincounter_sagemaker_pipeline


def compile_pipeline(path, cfg: Optional[PipelineConfig] = None):
    """Compile the SageMaker variant to ``path`` (YAML), ``cfg`` giving the stages' defaults."""
    from pathlib import Path

    from kfp import compiler

    compiler.Compiler().compile(make_pipeline(cfg), str(path))
    return Path(path)
