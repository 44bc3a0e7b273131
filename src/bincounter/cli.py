"""``bincounter``: one subcommand per stage, plus the whole pipeline, serving and prediction.

Every option comes from the typed configs in ``bincounter.config`` (via tyro), so ``--help``
shows each stage's parameters with their defaults and descriptions.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Literal

import tyro

from bincounter.config import (
    AuditConfig,
    ClusterConfig,
    DeployConfig,
    EvaluateConfig,
    IngestConfig,
    PipelineConfig,
    PreprocessConfig,
    RegisterConfig,
    SageMakerConfig,
    ServeConfig,
    SynthConfig,
    TrainConfig,
)

Flat = tyro.conf.arg(name="")  # a stage's fields appear as top-level options


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _demo_module(name: str):
    """``bincounter_demo.<name>``, imported only when a demo command runs: the demo helpers
    (synthetic photos, local S3) live outside the library, which never imports them."""
    try:
        return importlib.import_module(f"bincounter_demo.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("bincounter_demo", f"bincounter_demo.{name}"):
            raise  # a dependency missing inside the demo package: its own message says which
        raise SystemExit("this command needs the demo package bincounter_demo, which is not installed here: "
                         "install bincounter from its source tree with pip install '.[demo]'") from exc


def synth(out: Path, cfg: Annotated[SynthConfig, Flat] = SynthConfig()) -> None:
    """Generate synthetic bin photos in the bucket's layout (offline demo data)."""
    ids = _demo_module("synth").generate(cfg, out, progress=True)
    _print({"out": str(out), "images": len(ids)})


def ingest(out: Path, cfg: Annotated[IngestConfig, Flat] = IngestConfig()) -> None:
    """Fetch photos and metadata from s3://aft-vbi-pds (or any endpoint/folder); resumable."""
    from bincounter import launch

    _print(launch.ingest(cfg, str(out)))


def preprocess(input: Path, out: Path, cfg: Annotated[PreprocessConfig, Flat] = PreprocessConfig()) -> None:
    """Validate, clean, split, resize and pack an ingested folder into webdataset shards."""
    from bincounter import launch

    _print(launch.preprocess(cfg, str(input), str(out)))


def train(data: str, out: Path, cfg: Annotated[TrainConfig, Flat] = TrainConfig(),
          tracking_uri: str | None = None, experiment: str = "bincounter") -> None:
    """Train a counter on preprocessed shards (a folder or s3://...); rerun with the same --out to
    resume. Works under torchrun; on a machine with several GPUs it starts one DDP process per GPU
    itself."""
    from bincounter import launch
    from bincounter.training.train import init_distributed

    rank, _ = init_distributed()
    if rank == 0:
        _print(launch.train(cfg, data, str(out), tracking_uri=tracking_uri, experiment=experiment))
    else:  # other ranks train without an MLflow run of their own
        from bincounter.training.train import train as run

        run(cfg, data, out)


def evaluate(model: Path, data: Path, out: Path, cfg: Annotated[EvaluateConfig, Flat] = EvaluateConfig(),
             originals: tuple[Path, ...] = (), tracking_uri: str | None = None, run_id: str | None = None) -> None:
    """Score a trained model on the held-out test split; write metrics, plots and a report.

    Args:
        originals: The ingest output folder(s) the data was made from: the test photos are then
            scored as the model server answers them (the headline figures), the shards beside.
    """
    from bincounter import launch

    out_ = launch.evaluate(cfg, str(model), str(data), str(out), originals=[str(p) for p in originals],
                           tracking_uri=tracking_uri, run_id=run_id)
    _print({**out_["summary"], **out_["comparison"], "path": out_["path"]})


def compare(candidate: tuple[Path, ...], baseline: tuple[Path, ...]) -> None:
    """Compare two models on the same test photos: accuracy, RMSE, and McNemar's exact test on the
    photos exactly one of them counted right, pooled over seeds.

    Args:
        candidate: Evaluation output folders (or predictions.csv) of the model tried, one per seed.
        baseline: The same for the model it is compared against, in the same seed order.
    """
    from bincounter.evaluation.compare import compare as run

    _print(run(list(candidate), list(baseline)).to_dict())


def register(model: Path, evaluation: Path, data: Path, cfg: Annotated[RegisterConfig, Flat] = RegisterConfig(),
             run_id: str | None = None) -> None:
    """Register a model version in MLflow as 'challenger'; promote to 'champion' if it wins."""
    from bincounter import launch

    marker = model / "mlflow_run_id"
    run_id = run_id or (marker.read_text().strip() if marker.exists() else None)
    _print(launch.register(cfg, str(model), str(evaluation), str(data), run_id=run_id))


def deploy(cfg: Annotated[DeployConfig, Flat] = DeployConfig(), name: str = "bincounter") -> None:
    """Deploy a registered model: local server, Kubernetes (kubectl), KServe or SageMaker."""
    from bincounter import launch

    _print(launch.deploy(cfg, name=name))


def undeploy(name: str = "bincounter") -> None:
    """Stop a local deployment started by 'deploy'."""
    from bincounter.deploy import stop

    _print({"stopped": stop("local", name)})


def serve(cfg: Annotated[ServeConfig, Flat] = ServeConfig()) -> None:
    """Serve a model in the foreground (the container runs the same server as
    ``python -m bincounter.serving``, which also reads $MODEL_URI, $PORT and $BINCOUNTER_SERVE_*)."""
    from bincounter.serving.app import run

    sys.exit(run(cfg))


def predict(images: tuple[Path, ...], /, model_uri: str = "models:/bincounter@champion",
            tracking_uri: str | None = None) -> None:
    """Count the items in local images with a registered model."""
    import mlflow
    import pandas as pd

    from bincounter import tracking

    tracking.configure(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    frame = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    for path, row in zip(images, frame.to_dict("records")):
        print(f"{path}\tcount={row['count']}\tconfidence={row['confidence']:.2f}\texpected={row['expected_count']:.2f}")


def audit(source: Annotated[str, tyro.conf.arg(metavar="SOURCE", help="s3://bucket[/prefix] or a folder.")], /,
          out: Path, cfg: Annotated[AuditConfig, Flat] = AuditConfig()) -> None:
    """Count every bin of a pod (s3://bucket[/prefix] or a folder, bucket layout), compare with the
    expected counts, and write audit.csv, audit.parquet and report.html to --out; rerun with the
    same --out to resume. SOURCE sets the source's uri (--source.* set its endpoint and signing)."""
    from bincounter import launch

    cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"uri": source})})
    _print(launch.audit(AuditConfig.model_validate(cfg.model_dump()), str(out)))


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
    import functools

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


def s3_server(folder: Path, bucket: str = "aft-vbi-pds", port: int = 0) -> None:
    """Serve a folder in the bucket's layout from a local S3 endpoint until Ctrl-C."""
    import time

    with _demo_module("s3server").LocalS3(port=port) as s3:
        n = s3.upload_folder(folder, bucket)
        print(f"s3://{bucket} ({n} objects) at {s3.endpoint}; Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def demo(n_images: int = 600, epochs: int = 4, keep_server: bool = False) -> None:
    """The whole pipeline end to end, offline: synthetic photos, a local S3 endpoint, training,
    registration, a local model server, and a few predictions next to the truth."""
    _demo_module("demo").run(n_images=n_images, epochs=epochs, keep_server=keep_server)


COMMANDS = {
    "synth": synth, "ingest": ingest, "preprocess": preprocess, "train": train, "evaluate": evaluate,
    "compare": compare, "register": register, "deploy": deploy, "undeploy": undeploy, "serve": serve,
    "predict": predict, "audit": audit,
    "pipeline": {"run": pipeline_run, "compile": pipeline_compile, "submit": pipeline_submit,
                 "compile-audit": pipeline_compile_audit, "rbac": pipeline_rbac},
    "s3-server": s3_server, "demo": demo,
}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    # "pipeline run" reads better than one hyphenated word; tyro takes one level of names.
    if len(args) >= 2 and args[0] == "pipeline" and args[1] in COMMANDS["pipeline"]:
        args = [f"pipeline-{args[1]}", *args[2:]]
    flat = {k: v for k, v in COMMANDS.items() if not isinstance(v, dict)}
    flat.update({f"pipeline-{k}": v for k, v in COMMANDS["pipeline"].items()})
    tyro.extras.subcommand_cli_from_dict(flat, args=args, prog="bincounter",
                                         description="Count the items in warehouse bin photos.")


if __name__ == "__main__":
    main()
