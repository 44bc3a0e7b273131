"""Stage launchers: what a KFP component (or the CLI) calls with a config and artifact paths.

Each launcher runs one stage, writes its outputs where it is told, and returns the small
metadata dict that the component attaches to its output artifact. No kfp import here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bincounter import tracking
from bincounter.fileio import atomic_write
from bincounter.config import (
    AuditConfig,
    DeployConfig,
    EvaluateConfig,
    IngestConfig,
    PreprocessConfig,
    RegisterConfig,
    SageMakerConfig,
    TrainConfig,
    TuneConfig,
)


def ingest(cfg: IngestConfig, out_dir: str, *, shard: int = 0, shards: int = 1) -> dict:
    from bincounter.data.ingest import ingest as run

    r = run(cfg, out_dir, shard=shard, shards=shards)
    atomic_write(Path(out_dir) / "ingest_config.json", json.dumps(cfg.model_dump(), indent=2).encode())
    return {"downloaded": r.downloaded, "skipped": r.skipped, "failed": r.failed, "bytes": r.bytes,
            "source": cfg.source.uri, "manifest": "manifest.jsonl", "shard": shard, "shards": shards,
            "reviewed": r.reviewed}


def merge_shards(cfg: PreprocessConfig, parts: list[str], out_dir: str, report_html: str | None = None) -> dict:
    """Join preprocessed shards into the training dataset (``bincounter.data.shards.merge``)."""
    from bincounter.data.preprocess import load_dataset_info
    from bincounter.data.shards import merge

    r = merge(cfg, parts, out_dir)
    if report_html:
        shutil.copyfile(Path(out_dir) / "report" / "report.html", report_html)
    info = load_dataset_info(out_dir)
    return {"sizes": r.sizes, "quarantined": r.quarantined, "classes": r.classes, "shards_merged": len(parts),
            "input_manifest_sha256": info["input_manifest_sha256"]}


def preprocess(cfg: PreprocessConfig, raw_dir: str, out_dir: str, report_html: str | None = None) -> dict:
    from bincounter.data.preprocess import load_dataset_info
    from bincounter.data.preprocess import preprocess as run

    r = run(cfg, raw_dir, out_dir)
    if report_html:
        shutil.copyfile(Path(out_dir) / "report" / "report.html", report_html)
    info = load_dataset_info(out_dir)
    return {"sizes": r.sizes, "quarantined": r.quarantined, "classes": r.classes,
            "input_manifest_sha256": info["input_manifest_sha256"]}


def tune(cfg: TuneConfig, base: TrainConfig, data_dir: str, out_dir: str, *, tracking_uri: str | None = None,
         experiment: str = "bincounter") -> dict:
    """The pipeline's search before training: trials start from ``base``; 0 trials switch it off."""
    from bincounter.training.tune import launch_tune

    return launch_tune(base.model_copy(update={"progress": False}), cfg, data_dir, out_dir,
                       tracking_uri=tracking_uri, experiment=experiment)


def train(cfg: TrainConfig, data_dir: str, model_dir: str, *, tracking_uri: str | None = None,
          experiment: str = "bincounter", curves_html: str | None = None, tuned_dir: str | None = None) -> dict:
    """Train inside an MLflow run; the run id travels on as artifact metadata. With ``tuned_dir``
    (a tune output) the search's best settings replace the ones it varied.

    On a machine with several GPUs (a pipeline task given ``--cluster.gpus N``) and no launcher
    around it, the training runs data-parallel: one DDP process per GPU (``train_data_parallel``)."""
    from bincounter.data.dataset import materialize
    from bincounter.data.preprocess import dataset_params, load_dataset_info
    from bincounter.training import train as training

    if tuned_dir is not None:
        from bincounter.training.tune import apply_best

        cfg = apply_best(cfg, tuned_dir)
    nproc = training.processes_per_node(cfg)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # not already a rank of torchrun or a PyTorchJob
        return train_data_parallel(cfg, data_dir, model_dir, nproc, tracking_uri=tracking_uri,
                                   experiment=experiment, curves_html=curves_html)
    data_dir = str(materialize(data_dir))
    info = load_dataset_info(data_dir)
    params = {**cfg.flat("train."), **dataset_params(info)}
    run_id = _resumable_run_id(Path(model_dir))
    with tracking.stage_run("train", params, tracking_uri=tracking_uri, experiment=experiment, run_id=run_id,
                            system_metrics=True) as mlrun:
        (Path(model_dir) / "mlflow_run_id").parent.mkdir(parents=True, exist_ok=True)
        (Path(model_dir) / "mlflow_run_id").write_text(mlrun.info.run_id)
        r = training.train(cfg, data_dir, model_dir)
        tracking.log_artifacts([Path(data_dir) / "report"], "data_report")
        _log_reviewed_lineage(data_dir, Path(model_dir))
    if curves_html:
        from bincounter.reporting import html_page

        pngs = sorted((Path(model_dir) / "plots").glob("*.png"))
        verdict = (f"best epoch {r.best_epoch}: val accuracy {r.best['val_accuracy']:.4f}, "
                   f"val RMSE {r.best['val_rmse']:.4f}" if "val_accuracy" in r.best
                   else f"no validation split: the last epoch ({r.best_epoch}) is kept")
        Path(curves_html).write_text(html_page("Training", [verdict], pngs))
    return {"mlflow_run_id": mlrun.info.run_id, "best_epoch": r.best_epoch,
            "val_accuracy": r.best.get("val_accuracy"), "val_rmse": r.best.get("val_rmse"),
            "backbone": cfg.backbone, "image_size": cfg.image_size, "stopped_early": r.stopped_early}


def _log_reviewed_lineage(data_dir: str, model_dir: Path) -> None:
    """The labels people gave (bincounter review) and where each came from, as
    ``data/reviewed_labels.csv`` in the run; its tag says how many."""
    import csv
    import io

    import mlflow

    from bincounter.data.preprocess import REVIEWED_COLUMNS, reviewed_lineage

    rows = reviewed_lineage(data_dir)
    mlflow.set_tag("data.reviewed_labels", str(len(rows)))
    if not rows:
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, REVIEWED_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = model_dir / "reviewed_labels.csv"
    atomic_write(path, text.getvalue().encode())
    tracking.log_artifacts([path], "data")


def train_data_parallel(cfg: TrainConfig, data_dir: str, model_dir: str, nproc: int, *,
                        tracking_uri: str | None = None, experiment: str = "bincounter",
                        curves_html: str | None = None) -> dict:
    """``train`` as ``nproc`` DDP processes on this machine under ``torch.distributed.run``.

    Rank 0 runs ``train`` itself (the MLflow run, the curves) and hands its result back through
    a file; the other ranks train without a run of their own, as ``bincounter train`` does under
    torchrun. Raises when any rank fails (their tracebacks are in the log above)."""
    with tempfile.TemporaryDirectory(prefix="bincounter-ddp-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"config": cfg.model_dump(mode="json"), "data_dir": str(data_dir),
                                   "model_dir": str(model_dir), "tracking_uri": tracking_uri,
                                   "experiment": experiment, "curves_html": curves_html, "result": str(result)}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0", "-m", "bincounter.launch", "train-rank", str(job)]
        code = subprocess.call(cmd)
        if code != 0 or not result.exists():
            raise RuntimeError(f"data-parallel training ({nproc} processes under torch.distributed.run) exited "
                               f"{code}{'' if result.exists() else ' without a result from rank 0'}: see the ranks' "
                               "tracebacks above")
        return json.loads(result.read_text())


def _train_rank(job_path: str) -> None:
    """One rank of ``train_data_parallel`` (torchrun sets RANK and WORLD_SIZE)."""
    job = json.loads(Path(job_path).read_text())
    cfg = TrainConfig.model_validate(job["config"])
    if int(os.environ.get("RANK", "0")) == 0:
        out = train(cfg, job["data_dir"], job["model_dir"], tracking_uri=job["tracking_uri"],
                    experiment=job["experiment"], curves_html=job["curves_html"])
        atomic_write(Path(job["result"]), json.dumps(out).encode())
    else:
        from bincounter.training.train import train as run

        run(cfg, job["data_dir"], job["model_dir"])


def _resumable_run_id(model_dir: Path) -> str | None:
    """A restarted training (same output folder, checkpoint present) continues its MLflow run."""
    marker = model_dir / "mlflow_run_id"
    return marker.read_text().strip() if marker.exists() and (model_dir / "checkpoint.pt").exists() else None


def evaluate(cfg: EvaluateConfig, model_dir: str, data_dir: str, out_dir: str, *, originals: list[str] | None = None,
             tracking_uri: str | None = None, experiment: str = "bincounter", run_id: str | None = None,
             report_html: str | None = None) -> dict:
    """Evaluate and log metrics and plots into the training run (one run per model).

    ``originals``: the ingest output folder(s) the dataset was made from; with them the
    headline figures score the served path (see ``bincounter.evaluation.evaluate``)."""
    from bincounter.evaluation.evaluate import evaluate as run
    from bincounter.model.calibration import VERDICT_FILE

    r = run(cfg, model_dir, data_dir, out_dir, originals=originals or None)
    calibration = {k: float(v) for k, v in r.metrics["calibration"].items() if isinstance(v, (int, float))}
    verdicts = verdict_metrics(r.verdicts)
    # The headline figures on the photos whose label is a person's count (a review on the floor);
    # just how many there are when none.
    reviewed = {f"test_reviewed_{k}": float(v) for k, v in r.metrics.get("reviewed", {"photos": 0}).items()
                if k in ("photos", "accuracy", "rmse") and isinstance(v, (int, float))}
    if run_id:
        with tracking.stage_run("evaluate", cfg.flat("evaluate."), tracking_uri=tracking_uri, experiment=experiment,
                                run_id=run_id):
            import mlflow

            # What test_* scored: "served" (original photos, the server's engine) or "shards".
            mlflow.set_tag("evaluate.path", r.metrics["path"])
            tracking.log_metrics({f"test_{k}": v for k, v in {**r.summary(), **r.comparison()}.items()})
            tracking.log_metrics({f"test_{k}": v for k, v in r.metrics["calibration"].items()})
            tracking.log_metrics(verdicts)
            tracking.log_metrics(reviewed)
            tracking.log_artifacts(r.plots, "evaluation")
            tracking.log_artifacts([Path(out_dir) / name for name in ("report.md", "metrics.json", VERDICT_FILE)],
                                   "evaluation")
    if report_html:
        shutil.copyfile(Path(out_dir) / "report.html", report_html)
    return {"summary": r.summary(), "comparison": r.comparison(), "path": r.metrics["path"],
            "verdicts": {**{f"calibration_{k}": v for k, v in calibration.items()}, **verdicts},
            "confusion_matrix": r.metrics["confusion_matrix"], "class_names": r.metrics["class_names"],
            "reviewed": reviewed}


def verdict_metrics(verdicts: dict) -> dict[str, float]:
    """The verdict figures as MLflow metrics: ``verdict_<rule>_<figure>_at_<rate>pct`` at the reported
    rates, and the chosen thresholds."""
    from bincounter.evaluation.verdicts import BEFORE, RATES

    out: dict[str, float] = {}
    for row in verdicts["figures"]:
        if row["error_rate"] not in RATES:
            continue
        rule = "before" if row["rule"] == BEFORE else row["rule"]
        for key in ("flag_precision", "flag_recall", "wrong_passed", "settled"):
            if row[key] is not None:
                out[f"verdict_{rule}_{key}_at_{100 * row['error_rate']:g}pct"] = row[key]
    for rule, pair in verdicts["chosen"].items():
        out.update({f"verdict_{rule}_{k}": v for k, v in pair.items()})
    return out


def register(cfg: RegisterConfig, model_dir: str, eval_dir: str, data_dir: str, *, run_id: str | None = None,
             pipeline_run_id: str | None = None, out_dir: str | None = None) -> dict:
    """Register the model and gate it: the champion is scored on the same test photos as the
    challenger (``eval_dir``'s), through the same served path (``bincounter.evaluation.gate``).
    With ``out_dir``, the gate's scores and the deploy step's smoke photos (``smoke/``: a few test
    photos and how the version that serves now answered them) are kept there."""
    from bincounter.config import EVAL_METRICS
    from bincounter.data.dataset import read_samples, shard_urls
    from bincounter.data.preprocess import load_dataset_info
    from bincounter.evaluation.gate import champion_scorer, paired_judge, write_smoke_set
    from bincounter.model.calibration import VERDICT_FILE
    from bincounter.model.spec import INT8_ONNX_FILE
    from bincounter.registry.register import register as run

    metrics = json.loads((Path(eval_dir) / "metrics.json").read_text())
    summary = {k: float(metrics[k]) for k in EVAL_METRICS if k in metrics}
    info = load_dataset_info(data_dir)
    lineage = {"data_manifest_sha256": str(info["input_manifest_sha256"]),
               "split": f"hash(id) salt={info['config']['split_salt']} val={info['config']['val_fraction']} "
                        f"test={info['config']['test_fraction']}",
               "pipeline_run_id": pipeline_run_id or "none"}
    examples = [jpg for _, jpg, _ in read_samples(shard_urls(data_dir, "test"))[:2]]
    spec = json.loads((Path(model_dir) / "model_spec.json").read_text())
    challenger = Path(eval_dir) / "predictions.csv"
    with tempfile.TemporaryDirectory(prefix="bincounter-gate-") as tmp:
        work = Path(out_dir) / "gate" if out_dir else Path(tmp)
        judge = paired_judge(cfg, spec, challenger, champion_scorer(cfg, data_dir, work))
        verdicts, int8 = Path(eval_dir) / VERDICT_FILE, Path(eval_dir) / INT8_ONNX_FILE
        r = run(cfg, model_dir, summary, judge=judge, run_id=run_id, lineage=lineage, example_images=examples,
                verdict_file=verdicts if verdicts.is_file() else None, int8_file=int8 if int8.is_file() else None)
        out = {"name": r.name, "version": r.version, "model_uri": r.model_uri, "promoted": r.promoted,
               "reason": r.reason, "champion_uri": f"models:/{r.name}@champion"}
        if out_dir and cfg.smoke_photos:
            from bincounter.registry.register import champion_version
            from mlflow import MlflowClient

            serving = champion_version(MlflowClient(), r.name) or r.version
            answers = challenger if serving == r.version else work / f"champion-v{serving}" / "predictions.csv"
            if answers.is_file():  # a champion kept without being scored here (refused) gets no smoke set
                write_smoke_set(data_dir, answers, list(spec["class_names"]), serving, Path(out_dir) / "smoke",
                                cfg.smoke_photos)
                out["smoke_version"] = serving
    return out


def deploy(cfg: DeployConfig, name: str = "bincounter", tracking_uri: str | None = None,
           smoke_dir: str | None = None) -> dict:
    """Deploy the model ``cfg.model_uri`` names now, pinned: an alias (``@champion``) is resolved
    once to its version (``models:/bincounter/7``), which the target serves and records with its
    training run and digest, so a restart or a rollback serves the same model. ``tracking_uri``
    (the run's MLflow server) is what cluster pods load the model from. With ``smoke_dir`` (the
    register step's smoke photos), a Kubernetes rollout is undone when its pods answer them worse
    than the serving version's evaluation did."""
    from mlflow import MlflowClient

    from bincounter.deploy import deploy as run
    from bincounter.registry.versions import pin

    uri = tracking_uri or tracking.default_tracking_uri()
    pinned = pin(cfg.model_uri, MlflowClient(tracking_uri=uri, registry_uri=uri))
    cfg = cfg.model_copy(update={"model_uri": pinned.uri})
    kwargs: dict = {"name": name} if cfg.target == "local" else {}
    if cfg.target in ("kubernetes", "kserve") and tracking_uri:
        kwargs["tracking_uri"] = tracking_uri
    kwargs["tags" if cfg.target == "sagemaker" else "labels"] = pinned.labels()
    if smoke_dir and cfg.target == "kubernetes":  # the registration's known photos, asked after the rollout
        kwargs["smoke_dir"] = smoke_dir
    result = run(cfg, **kwargs)
    return {k: v for k, v in result.items() if isinstance(v, (str, int, float, bool))}


def check(deploy: DeployConfig | None, *, tracking_uri: str | None = None) -> dict:
    """The pipeline's first task: fail in seconds on what would fail hours later. The tracking
    server answers; with ``deploy`` (None: deploy disabled) its target's prerequisites hold
    (``bincounter.deploy.check``). Returns what was checked."""
    from bincounter.deploy import check as check_deploy

    out: dict = {"tracking_uri": tracking.check_server(tracking_uri)}
    if deploy is not None:
        kwargs = {"tracking_uri": tracking_uri} if deploy.target in ("kubernetes", "kserve") and tracking_uri else {}
        out.update({f"deploy_{k}": v for k, v in check_deploy(deploy, **kwargs).items()})
    return out


def check_sagemaker(sm: SageMakerConfig, *, deploy_enabled: bool, tracking_uri: str | None = None) -> dict:
    """The SageMaker variant's first task: the tracking server answers, and the account's settings
    make a valid training job (and, with ``deploy_enabled``, a valid endpoint)."""
    from bincounter.sagemaker.jobs import training_job_request

    out: dict = {"tracking_uri": tracking.check_server(tracking_uri)}
    training_job_request(TrainConfig(), sm, name="bincounter-check", data_uri=sm.s3_uri(sm.data_prefix, "check"))
    out["training_image"] = sm.training_image
    if deploy_enabled:
        from bincounter.config import SageMakerHostingConfig
        from bincounter.deploy.sagemaker import build_requests
        from bincounter.sagemaker.steps import deploy_config, endpoint_network_and_secrets

        hosting = SageMakerHostingConfig(sagemaker=sm, tracking_uri=tracking_uri)
        build_requests(deploy_config(hosting, "models:/check/1"), endpoint_name=sm.endpoint_name,
                       tracking_uri=tracking_uri, **endpoint_network_and_secrets(sm))
        out["serving_image"] = sm.serving_image
    return out


def audit(cfg: AuditConfig, out_dir: str, *, report_html: str | None = None) -> dict:
    """Audit a pod; log the summary and report to MLflow (``cfg.track``). Returns the summary."""
    from dataclasses import asdict

    from bincounter.audit.outputs import ERRORS_FILE, PARQUET_FILE, REPORT_FILE, SUMMARY_FILE
    from bincounter.audit.pod import audit as run

    summary = run(cfg, out_dir)
    out = Path(out_dir)
    if cfg.track:
        import mlflow

        with tracking.stage_run("audit", cfg.flat("audit."), tracking_uri=cfg.tracking_uri, experiment=cfg.experiment):
            tracking.log_metrics(summary.metrics())
            mlflow.set_tags({"audit.counter": summary.counter, "audit.calibration": summary.calibration[:5000]})
            tracking.log_artifacts([out / n for n in (REPORT_FILE, SUMMARY_FILE, PARQUET_FILE, ERRORS_FILE)], "audit")
    if report_html:
        shutil.copyfile(out / REPORT_FILE, report_html)
    return asdict(summary)


if __name__ == "__main__":  # python -m bincounter.launch train-rank JOB (what train_data_parallel starts)
    if sys.argv[1:2] != ["train-rank"] or len(sys.argv) != 3:
        sys.exit("usage: python -m bincounter.launch train-rank JOB.json (started by launch.train_data_parallel)")
    _train_rank(sys.argv[2])
