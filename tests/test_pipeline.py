import inspect
import json

import pytest
import yaml

from bincounter.config import (DeployConfig, EvaluateConfig, IngestConfig, PipelineConfig, PreprocessConfig,
                               SourceConfig, SynthConfig, TrainConfig)
from pipelines.bincounter_pipeline import make_pipeline
from pipelines.runner import arguments, compile_pipeline

STAGES = {"ingest", "preprocess", "tune", "train", "evaluate", "register", "deploy"}


@pytest.mark.parametrize("gpus", [0, 2])
def test_pipeline_compiles_with_every_stage_on_the_project_image(tmp_path, gpus):
    path = compile_pipeline(tmp_path / "pipeline.yaml", gpus=gpus)
    spec = yaml.safe_load(path.read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert {name.removeprefix("exec-") for name in executors} == STAGES
    for executor in executors.values():
        assert executor["container"]["image"] == "ghcr.io/bincounter/bincounter:0.1.0"
        assert "pip install" not in " ".join(executor["container"]["command"])  # the image has everything
    for stage in ("exec-tune", "exec-train"):
        resources = executors[stage]["container"].get("resources", {})
        if gpus:
            assert resources["accelerator"]["resourceCount"] == str(gpus)
        else:
            assert "accelerator" not in resources


def test_pipeline_defaults_equal_the_typed_config():
    """Users of the Kubeflow UI and of the CLI must get the same defaults."""
    signature = inspect.signature(make_pipeline().pipeline_func)
    defaults = {name: p.default for name, p in signature.parameters.items()}
    expected = arguments(PipelineConfig(), tracking_uri="")
    assert defaults == expected


@pytest.mark.slow
def test_whole_pipeline_runs_locally_and_serves_the_registered_model(synth_dir, tmp_path, isolated_home):
    """Integration: moto S3 -> kfp local runner -> MLflow registry -> local model server."""
    from mlflow import MlflowClient

    from bincounter.client import count_images
    from bincounter.deploy import stop
    from bincounter.s3server import LocalS3
    from bincounter.synth import generate
    from pipelines.runner import run_local

    src = tmp_path / "bucket"
    generate(SynthConfig(n_images=120, image_size=64, seed=3), src)
    tracking_uri = f"sqlite:///{isolated_home / 'mlflow.db'}"
    with LocalS3() as s3:
        s3.upload_folder(src, "aft-vbi-pds")
        cfg = PipelineConfig(
            ingest=IngestConfig(source=SourceConfig(uri="s3://aft-vbi-pds", endpoint_url=s3.endpoint), workers=8),
            preprocess=PreprocessConfig(image_size=48, workers=1),
            train=TrainConfig(backbone="tiny_cnn", pretrained="none", image_size=48, epochs=2, workers=0,
                              freeze_early=0, tta=False),
            evaluate=EvaluateConfig(batch_size=32, latency_samples=2),
            deploy=DeployConfig(target="local", port=0),
        )
        try:
            run_local(cfg, tracking_uri, tmp_path / "kfp")
            client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
            champion = client.get_model_version_by_alias("bincounter", "champion")
            tags = champion.tags
            assert {"promotion.decision", "lineage.data_manifest_sha256", "lineage.pipeline_run_id",
                    "lineage.training_run_id", "lineage.git_commit"} <= set(tags), tags
            assert champion.tags["promotion.decision"] == "promoted"
            assert float(champion.tags["metric.accuracy"]) >= 0
            assert champion.tags["lineage.data_manifest_sha256"] != "None"
            assert champion.tags["lineage.pipeline_run_id"] not in ("", "none")
            run = client.get_run(champion.tags["lineage.training_run_id"])
            prefixes = {key.split(".")[0] for key in run.data.params}
            assert {"ingest", "preprocess", "train", "evaluate", "register"} <= prefixes
            assert "test_accuracy" in run.data.metrics and "val_accuracy" in run.data.metrics
            state = json.loads((isolated_home / "deployments" / "bincounter.json").read_text())
            result = count_images(state["url"], [src / "bin-images" / "00001.jpg"])[0]
            assert 0 <= result["count"] <= 5 and len(result["probabilities"]) == 6
        finally:
            stop("local", "bincounter")
