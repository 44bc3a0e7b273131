"""Compile the pipeline for Kubeflow, or run it here on kfp's local SubprocessRunner."""

from __future__ import annotations

import os
from pathlib import Path

from bincounter.config import PipelineConfig


def arguments(cfg: PipelineConfig, tracking_uri: str) -> dict:
    """Pipeline arguments from the typed config (0 and "" stand for "not set")."""
    i, p, t, r, d = cfg.ingest, cfg.preprocess, cfg.train, cfg.registry, cfg.deploy
    if i.ids:
        raise ValueError("explicit ids are not a pipeline parameter; write them to a file_list.json")
    return dict(
        source_uri=i.source.uri, endpoint_url=i.source.endpoint_url or "", anonymous=i.source.anonymous,
        file_list=i.file_list or "", limit=i.limit or 0, per_class=i.per_class or 0, ingest_workers=i.workers,
        image_size=p.image_size, min_count=p.min_count, max_count=p.max_count, overflow=p.overflow,
        val_fraction=p.val_fraction, test_fraction=p.test_fraction,
        backbone=t.backbone, pretrained=t.pretrained, head=t.head, loss=t.loss, train_image_size=t.image_size,
        epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
        freeze_backbone=t.freeze_backbone, freeze_early=t.freeze_early, early_stopping_patience=t.early_stopping_patience,
        train_workers=t.workers, seed=t.seed, tune_trials=cfg.tune_trials, tune_epochs=cfg.tune_epochs,
        tune_backbones=",".join(cfg.tune_backbones), eval_batch_size=cfg.evaluate.batch_size,
        model_name=r.model_name, promotion_metric=r.metric, min_improvement=r.min_improvement,
        deploy_enabled=cfg.deploy_enabled, deploy_target=d.target,
        deploy_model_uri="" if d.model_uri == f"models:/{r.model_name}@champion" else d.model_uri,
        deploy_image=d.image, deploy_namespace=d.namespace, deploy_port=d.port, deploy_dry_run=d.dry_run,
        tracking_uri=tracking_uri, experiment=r.experiment,
    )


def compile_pipeline(path: str | Path, gpus: int = 0) -> Path:
    from kfp import compiler

    from pipelines.bincounter_pipeline import make_pipeline

    compiler.Compiler().compile(make_pipeline(gpus=gpus), str(path))
    return Path(path)


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
        return make_pipeline()(**arguments(cfg, tracking_uri))
