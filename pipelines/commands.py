"""``bincounter pipeline ...``: run, compile, submit, schedule and the cluster's RBAC.

Registered with the ``bincounter`` command line through the entry point group
``bincounter.commands`` (pyproject.toml), so the library's CLI reaches the pipelines without
importing them.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Literal

import tyro

from bincounter.config import AuditConfig, ClusterConfig, PipelineConfig, SageMakerConfig

Flat = tyro.conf.arg(name="")  # a stage's fields appear as top-level options


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def pipeline_run(cfg: Annotated[PipelineConfig, Flat] = PipelineConfig(), tracking_uri: str | None = None) -> None:
    """Run the whole pipeline here on kfp's local runner (every stage a local subprocess)."""
    from bincounter.paths import default_tracking_uri, home
    from pipelines.runner import run_local

    run_local(cfg, tracking_uri or default_tracking_uri(), cfg.pipeline_root or home() / "kfp")


def _sagemaker_or_none(backend: str, cluster: ClusterConfig, sagemaker: SageMakerConfig) -> SageMakerConfig | None:
    """The SageMaker account's settings when --backend sagemaker, else None; refuses options
    that do not apply to the chosen backend."""
    if backend == "sagemaker":
        if cluster.gpus:
            raise SystemExit("--cluster.gpus does not apply to --backend sagemaker: the training job's instance "
                             "type brings the GPU (--sagemaker.instance-type)")
        return sagemaker
    if sagemaker != SageMakerConfig():
        raise SystemExit("--sagemaker.* options apply to --backend sagemaker only")
    return None


def _refusals_as_messages(command):
    """A setting refused while compiling (a pod-local tracking store, a deploy value apart from the
    cluster's, --shards on an old backend) ends the command with its reason, not a traceback."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ValueError as exc:
            raise SystemExit(f"bincounter {command.__name__.replace('_', ' ', 1).replace('_', '-')}: {exc}") from exc

    return run


@_refusals_as_messages
def pipeline_compile(out: Path = Path("pipeline.yaml"), cfg: Annotated[PipelineConfig, Flat] = PipelineConfig(),
                     cluster: ClusterConfig = ClusterConfig(),
                     backend: Literal["kubeflow", "sagemaker"] = "kubeflow",
                     sagemaker: SageMakerConfig = SageMakerConfig()) -> None:
    """Compile the pipeline to an IR YAML for Kubeflow Pipelines (upload it, or 'pipeline submit' it).

    The stage options become the pipeline parameters' defaults; --cluster.* options set the
    tasks' images (and the served one), secrets, resources, retries, caching, GPU placement, the
    tracking server and the oldest KFP backend the YAML must run on. --backend sagemaker compiles
    the variant that trains in a SageMaker training job and hosts on a SageMaker endpoint; its
    --sagemaker.* options (the account, instances, limits) become the default of its one
    'sagemaker' struct parameter, and its pods take the same --cluster.* settings."""
    sm = _sagemaker_or_none(backend, cluster, sagemaker)
    if sm is not None:
        from pipelines.sagemaker_pipeline import compile_pipeline as compile_sagemaker

        _print({"compiled": str(compile_sagemaker(out, cfg, sm, cluster)), "kfp_backend": cluster.kfp_backend})
        return
    from pipelines.runner import compile_pipeline

    _print({"compiled": str(compile_pipeline(out, cfg, cluster)), "kfp_backend": cluster.kfp_backend})


@_refusals_as_messages
def pipeline_submit(host: str, cfg: Annotated[PipelineConfig, Flat] = PipelineConfig(),
                    cluster: ClusterConfig = ClusterConfig(), experiment: str = "bincounter",
                    run_name: str | None = None, wait: bool = False, timeout: float = 7 * 24 * 3600,
                    backend: Literal["kubeflow", "sagemaker"] = "kubeflow",
                    sagemaker: SageMakerConfig = SageMakerConfig()) -> None:
    """Compile, upload and start a run on Kubeflow Pipelines (kfp.Client) and print its URL.

    The stage options are the run's arguments; --cluster.* as for 'pipeline compile', and
    --cluster.namespace (the Kubeflow profile) and --cluster.service-account choose where and as
    whom the run goes. The server's release is checked against --cluster.kfp-backend first.
    --experiment is the KFP experiment. With --wait, follows the run to its end and exits non-zero
    unless it succeeded. --backend sagemaker starts the SageMaker variant, its --sagemaker.*
    options the run's 'sagemaker' argument."""
    from pipelines.runner import BackendTooOld, submit

    try:
        out = submit(host, cfg, cluster, sagemaker=_sagemaker_or_none(backend, cluster, sagemaker),
                     experiment=experiment, run_name=run_name, wait=wait, timeout=timeout)
    except BackendTooOld as exc:
        raise SystemExit(str(exc)) from exc
    _print(out)
    if wait and str(out["state"]).upper() != "SUCCEEDED":
        print(f"run {out['run_id']} ended {out['state']}: {out['url']}", file=sys.stderr)
        sys.exit(1)


@_refusals_as_messages
def pipeline_schedule(host: str, cron: str, cfg: Annotated[PipelineConfig, Flat] = PipelineConfig(),
                      cluster: ClusterConfig = ClusterConfig(), experiment: str = "bincounter",
                      job_name: str = "bincounter-retrain") -> None:
    """Compile, upload and schedule the pipeline as a Kubeflow Pipelines recurring run; print its id and URL.

    --cron "0 3 * * *" (minute hour day-of-month month day-of-week: every day at 03:00, in the KFP
    scheduler's time zone) becomes KFP's 6-field form with a seconds field; KFP's own 6-field form
    is taken as it is. At most one run at a time, and runs missed while the schedule was paused
    are not replayed. With --ingest.reviews, ingest is never cached, so each run reads the reviews
    written since the last one; register's gate decides whether the new model is promoted. The
    stage options are every run's arguments; --cluster.*, --experiment as for 'pipeline submit'.
    --job-name names the recurring run: one of that name already in the experiment is refused.
    The Kubeflow variant only: the SageMaker variant is not scheduled by this command."""
    from pipelines.runner import BackendTooOld, schedule

    try:
        out = schedule(host, cron, cfg, cluster, experiment=experiment, job_name=job_name)
    except BackendTooOld as exc:
        raise SystemExit(str(exc)) from exc
    _print(out)


@_refusals_as_messages
def pipeline_compile_audit(out: Path = Path("audit_pipeline.yaml"),
                           cfg: Annotated[AuditConfig, Flat] = AuditConfig(),
                           cluster: ClusterConfig = ClusterConfig()) -> None:
    """Compile the audit pipeline (one audit component) for a Kubeflow recurring run: the audit
    options become its config parameter's default (its tracking store the cluster's server unless
    --tracking-uri names another), --cluster.* set the task's image, secrets, retries and resources."""
    from pipelines.audit_pipeline import compile_audit_pipeline

    _print({"compiled": str(compile_audit_pipeline(out, cfg, cluster)), "kfp_backend": cluster.kfp_backend})


@_refusals_as_messages
def pipeline_rbac(cluster: ClusterConfig = ClusterConfig()) -> None:
    """Print the RBAC a cluster run needs, for --cluster.namespace (where runs go),
    --cluster.service-account (default bincounter-pipeline, created here with what KFP's launcher
    needs) and --cluster.serving-namespace (where the deploy step applies the serving manifests):
    pipe it to `kubectl apply -f -`. manifests/pipeline holds it for the defaults."""
    from bincounter.deploy.rbac import render_yaml

    print(render_yaml(cluster), end="")


COMMANDS = {"pipeline": {"run": pipeline_run, "compile": pipeline_compile, "submit": pipeline_submit,
                         "schedule": pipeline_schedule, "compile-audit": pipeline_compile_audit, "rbac": pipeline_rbac}}
