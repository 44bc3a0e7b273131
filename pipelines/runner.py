"""Compile the pipelines for Kubeflow, submit or schedule them, or run the main one on kfp's local runner.

Every variant (main, SageMaker, audit) is compiled through :func:`compile_for`, which writes
the YAML the way ``ClusterConfig.kfp_backend`` can read it; ``submit`` asks the server its
release first and refuses one older than the YAML needs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import yaml

from bincounter.config import (ClusterConfig, DeployConfig, PipelineConfig, SageMakerConfig, check_tracking_server,
                               version_tuple)

log = logging.getLogger(__name__)

# DeployConfig fields whose value on a cluster comes from ClusterConfig (their one source there).
CLUSTER_DEPLOY_FIELDS = {"image": "serving-image", "namespace": "serving-namespace",
                         "mlflow_secret": "mlflow-secret", "aws_secret": "aws-secret"}


def arguments(cfg: PipelineConfig, tracking_uri: str, cluster: ClusterConfig | None = None) -> dict:
    """The run's arguments: exactly the pipeline's parameters (``bincounter_pipeline.parameters``)."""
    from pipelines.bincounter_pipeline import NEWEST, parameters

    return parameters(cfg, tracking_uri, backend=cluster.kfp_backend if cluster else NEWEST)


def sagemaker_arguments(cfg: PipelineConfig, sagemaker: SageMakerConfig, cluster: ClusterConfig) -> dict:
    """The SageMaker variant's arguments: its own parameters (``sagemaker_pipeline.parameters``)."""
    from pipelines.sagemaker_pipeline import parameters

    return parameters(cfg, sagemaker, cluster)


def deploy_on_cluster(deploy: DeployConfig, cluster: ClusterConfig) -> DeployConfig:
    """``deploy`` as the cluster runs it: its image, namespace and secrets are the cluster's, and
    a local target (a server dying with its pod) becomes the cluster's. A deploy value set apart
    from the cluster's is refused: one setting, one place."""
    ours = {"image": cluster.image_of("serving"), "namespace": cluster.serving_namespace,
            "mlflow_secret": cluster.mlflow_secret, "aws_secret": cluster.aws_secret}
    defaults = DeployConfig()
    for field, option in CLUSTER_DEPLOY_FIELDS.items():
        own = getattr(deploy, field)
        if own != getattr(defaults, field) and own != ours[field]:
            raise ValueError(f"--deploy.{field.replace('_', '-')} {own!r} differs from the cluster's {ours[field]!r}: "
                             f"on a cluster set it once, with --cluster.{option}")
    values = {**deploy.model_dump(), **ours}
    if deploy.target == "local":
        values["target"] = cluster.deploy_target
    return DeployConfig.model_validate(values)


def for_cluster(cfg: PipelineConfig, cluster: ClusterConfig) -> PipelineConfig:
    """``cfg`` as it runs on a cluster: the deploy stage takes the cluster's image, namespace,
    secrets and target, and a registry store of its own must be a server, as the cluster's must."""
    if cfg.registry.tracking_uri:
        check_tracking_server(cfg.registry.tracking_uri, "--registry.tracking-uri")
    return cfg.model_copy(update={"deploy": deploy_on_cluster(cfg.deploy, cluster)})


def for_backend(path: Path, cluster: ClusterConfig) -> Path:
    """Rewrite the compiled YAML at ``path`` for ``cluster.kfp_backend``: backends before 2.15
    reject (2.14) or drop (2.5) ``optional`` on a secret's env, so it is left out there and the
    secrets' keys become required (docs/kubeflow.md)."""
    if cluster.backend_at_least("2.15"):
        return path
    docs = list(yaml.safe_load_all(path.read_text()))
    for doc in docs[1:]:
        for executor in doc.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get(
                "executors", {}).values():
            for secret in executor.get("secretAsEnv", []):
                secret.pop("optional", None)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def compile_for(pipeline, path: str | Path, cluster: ClusterConfig) -> Path:
    """Compile any of the pipelines to ``path`` for ``cluster``'s KFP backend."""
    from kfp import compiler

    compiler.Compiler().compile(pipeline, str(path))
    return for_backend(Path(path), cluster)


def compile_pipeline(path: str | Path, cfg: PipelineConfig | None = None,
                     cluster: ClusterConfig | None = None) -> Path:
    """Compile for a Kubeflow Pipelines cluster, ``cfg`` giving the parameters' defaults."""
    from pipelines.bincounter_pipeline import make_pipeline

    cluster = cluster or ClusterConfig()
    cfg = for_cluster(cfg or PipelineConfig(), cluster)
    return compile_for(make_pipeline(cfg, cluster, tracking_uri=cluster.tracking_uri), path, cluster)


class BackendTooOld(RuntimeError):
    """The KFP server is older than the release the YAML is compiled for."""


def server_release(client) -> str | None:
    """The KFP API server's release (its healthz ``tag_name``), or None when it does not say.

    kfp.Client's own healthz model keeps only ``multi_user``; the raw answer has the tag."""
    try:
        answer = client._healthz_api.healthz_service_get_healthz(_preload_content=False)
        tag = json.loads(answer.data or b"{}").get("tag_name")
    except Exception as exc:  # noqa: BLE001 - an older or proxied server: the version is unknown
        log.warning("could not read the KFP server's release from its healthz: %s", exc)
        return None
    return tag if tag and tag != "unknown" and version_tuple(tag) else None


def check_backend(client, cluster: ClusterConfig) -> str | None:
    """Refuse a server older than ``cluster.kfp_backend``; returns its release (None: unknown)."""
    release = server_release(client)
    if release is None:
        log.warning("the KFP server does not report its release (healthz tag_name); the YAML is compiled for "
                    "backends %s and newer: compile with --cluster.kfp-backend for an older one", cluster.kfp_backend)
    elif version_tuple(release)[:2] < version_tuple(cluster.kfp_backend)[:2]:
        raise BackendTooOld(
            f"the Kubeflow Pipelines server runs {release}, older than the {cluster.kfp_backend} this pipeline is "
            f"compiled for. Compile for it with --cluster.kfp-backend (2.14: secrets must hold every key; 2.5: "
            "also no --shards), or upgrade the backend (docs/kubeflow.md).")
    return release


def submit(host: str, cfg: PipelineConfig | None = None, cluster: ClusterConfig | None = None, *,
           sagemaker: SageMakerConfig | None = None, experiment: str = "bincounter", run_name: str | None = None,
           wait: bool = False, timeout: float = 7 * 24 * 3600, package: str | Path | None = None) -> dict:
    """Compile, upload and start a run on Kubeflow Pipelines at ``host`` through ``kfp.Client``.

    The run goes to ``cluster.namespace`` as ``cluster.service_account``; its arguments are
    ``cfg``'s stage configs (as on the cluster) and the cluster's tracking URI. With
    ``sagemaker``, the run is the SageMaker variant (training job and endpoint) with that
    account's settings. The server's release is checked against ``cluster.kfp_backend`` before
    anything is uploaded. With ``wait``, follows the run to its end; the result's ``state`` says
    how it ended. ``package`` keeps the compiled YAML there (default: a temporary file).
    """
    import tempfile

    from kfp import Client

    cluster = cluster or ClusterConfig()
    cfg = for_cluster(cfg or PipelineConfig(), cluster)
    client = Client(host=host, namespace=cluster.namespace)
    release = check_backend(client, cluster)
    with tempfile.TemporaryDirectory(prefix="bincounter-submit-") as tmp:
        package = package or Path(tmp) / "bincounter.yaml"
        if sagemaker is None:
            path = compile_pipeline(package, cfg, cluster)
            args = arguments(cfg, cluster.tracking_uri, cluster)
        else:
            from pipelines.sagemaker_pipeline import compile_pipeline as compile_sagemaker

            path = compile_sagemaker(package, cfg, sagemaker, cluster)
            args = sagemaker_arguments(cfg, sagemaker, cluster)
        run = client.create_run_from_pipeline_package(
            str(path), arguments=args, run_name=run_name, experiment_name=experiment, namespace=cluster.namespace,
            service_account=cluster.service_account)
    out = {"run_id": run.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}", "state": None,
           "server_release": release}
    if wait:
        out["state"] = client.wait_for_run_completion(run.run_id, timeout=timeout).state
    return out


# One cron field: numbers, ranges, steps, lists, names (MON, JAN) and robfig/cron's ? (any).
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*?,/-]+$")


def kfp_cron(expression: str) -> str:
    """``expression`` as KFP's scheduler reads it: 6 fields, seconds first (robfig/cron). The usual
    5-field form (minute hour day-of-month month day-of-week) gets a "0" seconds field; a 6-field
    one is taken as KFP's own. Anything else is refused (ValueError)."""
    fields = expression.split()
    if len(fields) not in (5, 6) or not all(_CRON_FIELD.match(f) for f in fields):
        raise ValueError(f"--cron {expression!r} is not a cron expression: give 5 fields, minute hour day-of-month "
                         "month day-of-week (\"0 3 * * *\": every day at 03:00), or KFP's 6 with seconds first "
                         "(\"0 0 3 * * *\")")
    return " ".join(["0", *fields] if len(fields) == 5 else fields)


def schedule(host: str, cron: str, cfg: PipelineConfig | None = None, cluster: ClusterConfig | None = None, *,
             experiment: str = "bincounter", job_name: str = "bincounter-retrain",
             package: str | Path | None = None) -> dict:
    """Compile and upload the pipeline as a Kubeflow Pipelines recurring run at ``host`` on ``cron``.

    Kubeflow variant only (the SageMaker variant is not scheduled here). Each run gets ``cfg``'s
    stage configs and the cluster's tracking URI as arguments, in ``cluster.namespace`` as
    ``cluster.service_account``, like :func:`submit`. At most one run at a time
    (``max_concurrency`` 1: two retrains never overlap), and no catch-up: runs missed while the
    schedule was paused or behind are not replayed. A recurring run of the same ``job_name``
    already in the experiment is refused (ValueError): a second schedule would overlap the first.
    The server's release is checked first. ``package`` keeps the compiled YAML there.
    """
    import contextlib
    import tempfile

    from kfp import Client

    cron = kfp_cron(cron)
    cluster = cluster or ClusterConfig()
    cfg = for_cluster(cfg or PipelineConfig(), cluster)
    client = Client(host=host, namespace=cluster.namespace)
    release = check_backend(client, cluster)
    with tempfile.TemporaryDirectory(prefix="bincounter-schedule-") as tmp:
        path = compile_pipeline(package or Path(tmp) / "bincounter.yaml", cfg, cluster)
        with contextlib.redirect_stdout(sys.stderr):  # kfp prints the experiment's link: keep stdout JSON
            experiment_id = client.create_experiment(experiment, namespace=cluster.namespace).experiment_id
        same_name = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name",
                                                "stringValue": job_name}]})
        existing = [r for r in client.list_recurring_runs(experiment_id=experiment_id, filter=same_name)
                    .recurring_runs or [] if r.display_name == job_name]
        if existing:
            rid = existing[0].recurring_run_id
            raise ValueError(f"experiment {experiment!r} already has a recurring run {job_name!r} ({rid}): delete it "
                             f"first (in the KFP UI, or `kfp --endpoint {host} recurring-run delete {rid}`), or name "
                             "this one with --job-name")
        job = client.create_recurring_run(
            experiment_id=experiment_id, job_name=job_name, cron_expression=cron, max_concurrency=1,
            no_catchup=True, params=arguments(cfg, cluster.tracking_uri, cluster), pipeline_package_path=str(path),
            service_account=cluster.service_account)
    return {"recurring_run_id": job.recurring_run_id, "cron": cron, "experiment_id": experiment_id,
            "url": f"{host.rstrip('/')}/#/recurringrun/details/{job.recurring_run_id}", "server_release": release}


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
