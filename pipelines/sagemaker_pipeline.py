"""The SageMaker variant: ingest -> preprocess on the cluster, training as a SageMaker job,
evaluate -> register on the job's model artifact, hosting on a SageMaker endpoint.

Wiring only, shared with the main pipeline where the stages are the same (``data_stages``,
``evaluate_and_register``). The pipeline's own pods request no GPU: the training job brings its
instances. Like every stage, the account's settings travel as ONE struct parameter,
``sagemaker`` (``SageMakerConfig.params()``), validated by ``SageMakerConfig`` inside the two
SageMaker components; the training settings are ``train`` (``TrainConfig``).
"""

from typing import Optional

from kfp import dsl

from bincounter.config import PipelineConfig, SageMakerConfig
from components.sagemaker_deploy import sagemaker_deploy
from components.sagemaker_train import sagemaker_train
from pipelines.bincounter_pipeline import data_stages, evaluate_and_register


def make_pipeline(defaults: Optional[PipelineConfig] = None, sagemaker: Optional[SageMakerConfig] = None):
    """Build the SageMaker variant of the bincounter pipeline; the stages' struct parameters
    default to ``defaults`` (as in the main pipeline), the ``sagemaker`` one to ``sagemaker``."""
    d = defaults or PipelineConfig()
    sm = sagemaker or SageMakerConfig()

    @dsl.pipeline(name="bincounter-sagemaker",
                  description="Count items in warehouse bin photos; training and hosting on Amazon SageMaker.")
    def bincounter_sagemaker_pipeline(
        sagemaker: dict = sm.params(),
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
        stages = data_stages(ingest, preprocess, shards)
        data = stages["merge_shards"]
        trained = sagemaker_train(data=data.outputs["data"], config=train, sagemaker=sagemaker,
                                  tracking_uri=tracking_uri, experiment=experiment)
        # It only uploads, polls and downloads; the job's instances do the training.
        trained.set_cpu_request("500m").set_memory_request("2G")
        registered = evaluate_and_register(trained.outputs["model"], data.outputs["data"], evaluate, registry,
                                           tracking_uri, experiment)["register"]
        with dsl.If(deploy_enabled == True):  # noqa: E712 - kfp builds a condition from ==
            served = sagemaker_deploy(registration=registered.outputs["registration"], sagemaker=sagemaker,
                                      model_uri=deploy_model_uri, tracking_uri=tracking_uri)
            # Deploying changes the world outside the pipeline: never cache it.
            served.set_caching_options(False)

    return bincounter_sagemaker_pipeline


def compile_pipeline(path, cfg: Optional[PipelineConfig] = None, sagemaker: Optional[SageMakerConfig] = None):
    """Compile the SageMaker variant to ``path`` (YAML), ``cfg`` and ``sagemaker`` giving the
    parameters' defaults."""
    from pathlib import Path

    from kfp import compiler

    compiler.Compiler().compile(make_pipeline(cfg, sagemaker), str(path))
    return Path(path)
