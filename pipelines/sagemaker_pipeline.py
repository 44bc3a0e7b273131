"""The SageMaker variant: ingest -> preprocess on the cluster, training as a SageMaker job,
evaluate -> register on the job's model artifact, hosting on a SageMaker endpoint.

Wiring only, shared with the main pipeline where the stages are the same (``data_stages``,
``evaluate_and_register``). The pipeline's own pods request no GPU: the training job brings its
instances; they run the cluster's CPU image with its secrets, retries and resources
(``pipelines.cluster``), and log to the cluster's tracking server. Like every stage, the
account's settings travel as ONE struct parameter, ``sagemaker`` (``SageMakerConfig.params()``),
validated by ``SageMakerConfig`` inside the SageMaker components; the training settings are
``train`` (``TrainConfig``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from kfp import dsl

from bincounter import config
from bincounter.config import ClusterConfig, PipelineConfig, SageMakerConfig
from components.check import sagemaker_check
from components.sagemaker_deploy import sagemaker_deploy
from components.sagemaker_train import sagemaker_train
from pipelines.bincounter_pipeline import (data_stages, evaluate_and_register, shards_supported, uncache_reviewed_ingest,
                                          with_signature)

# The stages this variant takes from PipelineConfig: the training job has no search before it, and
# the endpoint is its deploy (its settings are the ``sagemaker`` struct's).
STAGES = tuple(stage for stage in config.STAGES if stage not in ("tune", "deploy"))


def parameters(cfg: PipelineConfig, sagemaker: SageMakerConfig, cluster: ClusterConfig) -> dict[str, Any]:
    """The variant's parameters with their defaults, in signature order."""
    params: dict[str, Any] = {"sagemaker": sagemaker.params(),
                              **{stage: getattr(cfg, stage).params() for stage in STAGES}}
    if shards_supported(cluster.kfp_backend):
        params["shards"] = cfg.shards
    elif cfg.shards > 1:
        raise ValueError(f"--shards {cfg.shards} needs a KFP backend of 2.14 or newer (dsl.Collected)")
    params.update(deploy_enabled=cfg.deploy_enabled, deploy_model_uri="", tracking_uri=cluster.tracking_uri,
                  experiment=cfg.registry.experiment)
    return params


def make_pipeline(defaults: Optional[PipelineConfig] = None, sagemaker: Optional[SageMakerConfig] = None,
                  cluster: Optional[ClusterConfig] = None):
    """Build the SageMaker variant; the stages' struct parameters default to ``defaults`` (as in the
    main pipeline), the ``sagemaker`` one to ``sagemaker``; every task gets ``cluster``'s settings."""
    cluster = cluster or ClusterConfig()
    params = parameters(defaults or PipelineConfig(), sagemaker or SageMakerConfig(), cluster)

    def body(p: dict) -> None:
        checked = sagemaker_check(sagemaker=p["sagemaker"], deploy_enabled=p["deploy_enabled"],
                                  tracking_uri=p["tracking_uri"])
        checked.set_caching_options(False)
        tasks, data = data_stages(p["ingest"], p["preprocess"], p.get("shards"))
        tasks["check"] = checked
        trained = sagemaker_train(data=data, config=p["train"], sagemaker=p["sagemaker"],
                                  tracking_uri=p["tracking_uri"], experiment=p["experiment"]).after(checked)
        tasks["sagemaker_train"] = trained
        tasks.update(evaluate_and_register(trained.outputs["model"], data, p["evaluate"], p["registry"],
                                           p["tracking_uri"], p["experiment"]))
        with dsl.If(p["deploy_enabled"] == True):  # noqa: E712 - kfp builds a condition from ==
            served = sagemaker_deploy(registration=tasks["register"].outputs["registration"],
                                      sagemaker=p["sagemaker"], model_uri=p["deploy_model_uri"],
                                      tracking_uri=p["tracking_uri"])
            # Deploying changes the world outside the pipeline: never cache it.
            served.set_caching_options(False)
            tasks["sagemaker_deploy"] = served
        from pipelines.cluster import configure

        configure(tasks.values(), cluster)
        uncache_reviewed_ingest(tasks, defaults or PipelineConfig())

    return dsl.pipeline(name="bincounter-sagemaker", description="Count items in warehouse bin photos; training and "
                        "hosting on Amazon SageMaker.")(with_signature(body, params))


def compile_pipeline(path, cfg: Optional[PipelineConfig] = None, sagemaker: Optional[SageMakerConfig] = None,
                     cluster: Optional[ClusterConfig] = None) -> Path:
    """Compile the SageMaker variant to ``path`` (YAML), ``cfg``, ``sagemaker`` and ``cluster`` giving
    the parameters' defaults and the tasks' settings."""
    from pipelines.runner import compile_for, for_cluster

    cluster = cluster or ClusterConfig()
    cfg = for_cluster(cfg or PipelineConfig(), cluster)
    return compile_for(make_pipeline(cfg, sagemaker, cluster), path, cluster)
