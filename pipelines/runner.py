"""Compile the pipeline for Kubeflow, or run it here on kfp's local SubprocessRunner."""

from __future__ import annotations

import os
from pathlib import Path

from bincounter.config import STAGES, ClusterConfig, PipelineConfig, SageMakerConfig


def arguments(cfg: PipelineConfig, tracking_uri: str) -> dict:
    """Pipeline arguments from the typed config: one struct per stage, plus the run's settings."""
    return {**{stage: getattr(cfg, stage).params() for stage in STAGES}, "shards": cfg.shards,
            "deploy_enabled": cfg.deploy_enabled,
            "tracking_uri": tracking_uri, "experiment": cfg.registry.experiment}


def sagemaker_arguments(cfg: PipelineConfig, sagemaker: SageMakerConfig, tracking_uri: str) -> dict:
    """The SageMaker variant's arguments: the same structs as ``arguments`` where that variant
    takes them (read off its own signature, so the two cannot drift), plus the account's struct."""
    from pipelines.sagemaker_pipeline import make_pipeline

    names = make_pipeline(cfg, sagemaker).component_spec.inputs
    return {**{k: v for k, v in arguments(cfg, tracking_uri).items() if k in names}, "sagemaker": sagemaker.params()}


def for_cluster(cfg: PipelineConfig, cluster: ClusterConfig) -> PipelineConfig:
    """``cfg`` as it runs on a cluster: a local deploy target (a server dying with its pod) becomes
    the cluster's, and a registry store of its own must be a server, as the cluster's must."""
    if cfg.registry.tracking_uri:
        cluster.model_validate({**cluster.model_dump(), "tracking_uri": cfg.registry.tracking_uri})
    if cfg.deploy.target == "local":
        cfg = cfg.model_copy(update={"deploy": cfg.deploy.model_copy(update={"target": cluster.deploy_target})})
    return cfg


def compile_pipeline(path: str | Path, cfg: PipelineConfig | None = None,
                     cluster: ClusterConfig | None = None) -> Path:
    """Compile for a Kubeflow Pipelines 2.x cluster, ``cfg`` giving the parameters' defaults."""
    from kfp import compiler

    from pipelines.bincounter_pipeline import make_pipeline

    cluster = cluster or ClusterConfig()
    cfg = for_cluster(cfg or PipelineConfig(), cluster)
    compiler.Compiler().compile(make_pipeline(cfg, cluster, tracking_uri=cluster.tracking_uri), str(path))
    return Path(path)


def submit(host: str, cfg: PipelineConfig | None = None, cluster: ClusterConfig | None = None, *,
           sagemaker: SageMakerConfig | None = None,
           namespace: str | None = None, experiment: str = "bincounter", run_name: str | None = None,
           service_account: str | None = None, wait: bool = False, timeout: float = 7 * 24 * 3600,
           package: str | Path | None = None) -> dict:
    """Compile, upload and start a run on Kubeflow Pipelines at ``host`` through ``kfp.Client``.

    The run's arguments are ``cfg``'s stage configs (as on the cluster) and the cluster's
    tracking URI. With ``sagemaker``, the run is the SageMaker variant (training job and endpoint)
    with that account's settings. With ``wait``, follows the run to its end; the result's
    ``state`` says how it ended. ``package`` keeps the compiled YAML there (default: a temporary file).
    """
    import tempfile

    from kfp import Client

    cluster = cluster or ClusterConfig()
    cfg = for_cluster(cfg or PipelineConfig(), cluster)
    with tempfile.TemporaryDirectory(prefix="bincounter-submit-") as tmp:
        package = package or Path(tmp) / "bincounter.yaml"
        if sagemaker is None:
            path = compile_pipeline(package, cfg, cluster)
            args = arguments(cfg, cluster.tracking_uri)
        else:
            from pipelines.sagemaker_pipeline import compile_pipeline as compile_sagemaker

            path = compile_sagemaker(package, cfg, sagemaker)
            args = sagemaker_arguments(cfg, sagemaker, cluster.tracking_uri)
        client = Client(host=host, namespace=namespace or "kubeflow")
        run = client.create_run_from_pipeline_package(
            str(path), arguments=args, run_name=run_name,
            experiment_name=experiment, namespace=namespace, service_account=service_account)
    out = {"run_id": run.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}", "state": None}
    if wait:
        out["state"] = client.wait_for_run_completion(run.run_id, timeout=timeout).state
    return out


def run_local(cfg: PipelineConfig, tracking_uri: str, pipeline_root: str | Path):
    """Run every stage as a local subprocess in this Python environment."""
    import warnings

    from kfp import local

    from pipelines.bincounter_pipeline import make_pipeline

    Path(pipeline_root).mkdir(parents=True, exist_ok=True)
    # Components resolve the tracking store and working folder from the environment too.
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    with warnings.catch_warnings():
        # kfp warns that our image name has no "python" in it; the local runner ignores images.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        return make_pipeline(cfg)(**arguments(cfg, tracking_uri))
