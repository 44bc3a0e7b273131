import json
import os
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from bincounter.config import (STAGES, ClusterConfig, DeployConfig, EvaluateConfig, IngestConfig, PipelineConfig,
                               PreprocessConfig, SourceConfig, TrainConfig, TuneConfig)
from bincounter_demo.synth import SynthConfig
from pipelines.runner import arguments, compile_pipeline

TASKS = {"check", "ingest", "preprocess", "tune", "train", "evaluate", "register", "deploy"}
SEARCH = PipelineConfig(tune=TuneConfig(trials=2))
SPY = Path(__file__).parent / "pipeline_spy"


def _compiled(tmp_path, **kwargs) -> dict:
    """The pipeline spec; its ``platforms`` key holds the second YAML document (kfp-kubernetes)."""
    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path / "pipeline.yaml", **kwargs).read_text()))
    return {**docs[0], **(docs[1] if len(docs) > 1 else {})}


@pytest.mark.parametrize("gpus", [0, 2])
def test_pipeline_compiles_with_every_stage_on_the_project_images(tmp_path, gpus):
    spec = _compiled(tmp_path, cfg=SEARCH, cluster=ClusterConfig(gpus=gpus))
    executors = spec["deploymentSpec"]["executors"]
    assert {name.removeprefix("exec-") for name in executors} >= TASKS
    for name, executor in executors.items():
        gpu_task = gpus and name in ("exec-tune", "exec-train")
        tag = "0.1.0-cuda" if gpu_task else "0.1.0"
        assert executor["container"]["image"] == f"ghcr.io/bincounter/bincounter:{tag}"
        assert "pip install" not in " ".join(executor["container"]["command"])  # the image has everything
        resources = executor["container"]["resources"]
        if gpu_task:
            assert resources["accelerator"] == {"count": str(gpus), "resourceCount": str(gpus),
                                                "type": "nvidia.com/gpu", "resourceType": "nvidia.com/gpu"}
        else:
            assert "accelerator" not in resources


def test_image_names_are_compile_options(tmp_path, monkeypatch):
    monkeypatch.setenv("BINCOUNTER_IMAGE", "registry.example/bc:7")
    monkeypatch.setenv("BINCOUNTER_CUDA_IMAGE", "registry.example/bc:7-gpu")
    executors = _compiled(tmp_path, cluster=ClusterConfig(gpus=1))["deploymentSpec"]["executors"]
    assert executors["exec-train"]["container"]["image"] == "registry.example/bc:7-gpu"
    assert executors["exec-evaluate"]["container"]["image"] == "registry.example/bc:7"


def test_evaluation_reads_the_merged_dataset_not_every_ingest_output(tmp_path):
    """The served path's original photos travel in the dataset (preprocess keeps the test split's):
    evaluation downloads a tenth of the photos, not every ingest shard's output."""
    spec = _compiled(tmp_path)
    inputs = spec["root"]["dag"]["tasks"]["evaluate"]["inputs"]["artifacts"]
    assert set(inputs) == {"model", "data"}
    assert inputs["data"]["taskOutputArtifact"] == {"outputArtifactKey": "data", "producerTask": "merge-shards"}


def test_pipeline_parameters_are_the_stage_configs(tmp_path):
    """Users of the Kubeflow UI and of the CLI get the same defaults: one struct per stage (tune only
    when the pipeline searches), and the run's arguments are exactly its parameters."""
    for cfg, stages in ((SEARCH, set(STAGES)), (PipelineConfig(), set(STAGES) - {"tune"})):
        params = _compiled(tmp_path, cfg=cfg)["root"]["inputDefinitions"]["parameters"]
        assert set(params) == {*stages, "shards", "deploy_enabled", "tracking_uri", "experiment"}
        assert set(arguments(cfg, "")) == set(params)
        for stage in stages:
            assert params[stage]["parameterType"] == "STRUCT"


# --- every field reaches its stage ---------------------------------------------------------------

OVERRIDES = {  # where "a different value of the same type" would not be a meaningful setting
    "ingest.source.uri": "s3://another-bucket/prefix",
    "ingest.source.endpoint_url": "http://minio.example:9000",
    "ingest.file_list": "s3://another-bucket/file_list.json",
    "preprocess.val_fraction": 0.15,
    "preprocess.test_fraction": 0.2,
    "train.pretrained": "none",
    "train.device": "cpu",
    "train.checkpoint_uri": "s3://another-bucket/checkpoints",
    "evaluate.device": "cpu",
    "evaluate.verdict.off_by_one_share": 0.7,  # the two shares add up to at most 1
    "evaluate.verdict.off_by_more_share": 0.1,
    "evaluate.verdict.flag_threshold": 0.1,  # below the match threshold
    "evaluate.verdict.match_threshold": 0.8,
    "registry.tracking_uri": "http://mlflow.example:5000",
    "deploy.model_uri": "models:/bincounter/7",
    "deploy.sagemaker_role_arn": "arn:aws:iam::123456789012:role/bincounter",
}


def _leaves(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaves(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _other_value(path: str, field):
    if path in OVERRIDES:
        return OVERRIDES[path]
    default = field.get_default(call_default_factory=True)
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    bounds = {type(m).__name__: m for m in field.metadata}
    if typing.get_origin(kind) is typing.Literal:
        return next(c for c in typing.get_args(kind) if c != default)
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        item = args[0]
        if typing.get_origin(item) is typing.Literal:
            return (typing.get_args(item)[1],)
        if len(args) == 2 and args[1] is not Ellipsis:  # a (low, high) range
            return (default[0], (default[0] + default[1]) / 2)
        if item is int:
            return tuple(v + 1 for v in default)
        return ("00042",)
    if kind is bool:
        return not default
    if kind is int:
        value = 3 if default is None else default + 1
        return value - 2 if "Le" in bounds and value > bounds["Le"].le else value
    if kind is float:
        top = bounds["Lt"].lt if "Lt" in bounds else bounds["Le"].le if "Le" in bounds else (default or 0) + 2
        return ((default or 0) + top) / 2
    if kind is str:
        return f"{default or 'x'}-changed"
    raise AssertionError(f"{path}: no rule for {field.annotation}")


def _nested(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def everything_changed() -> PipelineConfig:
    """A valid PipelineConfig whose every stage field differs from its default."""
    flat = {path: _other_value(path, field) for path, field in _leaves(PipelineConfig)
            if path.split(".")[0] in STAGES}
    cfg = PipelineConfig.model_validate(_nested(flat))
    for path, _ in _leaves(PipelineConfig):
        if path.split(".")[0] in STAGES:
            value = cfg
            default = PipelineConfig()
            for part in path.split("."):
                value, default = getattr(value, part), getattr(default, part)
            assert value != default, path
    return cfg


def cluster_for(deploy: DeployConfig) -> ClusterConfig:
    """The cluster whose settings ``deploy``'s cluster-owned fields (image, namespace, secrets) are."""
    return ClusterConfig(serving_image=deploy.image, serving_namespace=deploy.namespace,
                         mlflow_secret=deploy.mlflow_secret, aws_secret=deploy.aws_secret)


def test_every_stage_field_reaches_the_compiled_pipeline(tmp_path):
    cfg = everything_changed().model_copy(update={"deploy_enabled": False, "shards": 4})
    params = _compiled(tmp_path, cfg=cfg, cluster=cluster_for(cfg.deploy))["root"]["inputDefinitions"]["parameters"]
    for stage in STAGES:
        assert type(getattr(cfg, stage)).model_validate(params[stage]["defaultValue"]) == getattr(cfg, stage), stage
    assert params["deploy_enabled"]["defaultValue"] is False
    assert params["shards"]["defaultValue"] == 4
    assert params["experiment"]["defaultValue"] == cfg.registry.experiment
    # Top-level fields are stages or run-level settings; only the local runner's folder stays local.
    assert set(PipelineConfig.model_fields) - set(STAGES) == {"shards", "deploy_enabled", "pipeline_root"}


COMPONENT_CONFIGS = [("ingest", "ingest", IngestConfig), ("preprocess", "preprocess", PreprocessConfig),
                     ("tune", "tune", None), ("train", "train", TrainConfig), ("evaluate", "evaluate", EvaluateConfig),
                     ("register", "register", None), ("deploy", "deploy", DeployConfig)]


@pytest.mark.parametrize("module", ["ingest", "preprocess", "tune", "train", "evaluate", "register", "deploy"])
def test_a_misspelled_field_fails_in_the_component_before_any_work(module):
    import importlib
    import inspect

    from pydantic import ValidationError

    component = getattr(importlib.import_module(f"components.{module}"), module)
    stage = "registry" if module == "register" else module
    config = {**getattr(PipelineConfig(), stage).params(), "epoch": 3}
    kwargs = {name: None for name in inspect.signature(component.python_func).parameters}
    with pytest.raises(ValidationError, match="epoch"):
        component.python_func(**{**kwargs, "config": config})


@pytest.mark.slow
def test_every_stage_field_reaches_its_stage_on_the_local_runner(tmp_path, monkeypatch):
    """One local run with every field changed; a spy (tests/pipelines/pipeline_spy) records what each stage got."""
    from pipelines.runner import run_local

    spy = tmp_path / "spy"
    spy.mkdir()
    monkeypatch.setenv("BINCOUNTER_SPY_DIR", str(spy))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SPY), os.environ.get("PYTHONPATH", "")]))
    cfg = everything_changed().model_copy(update={"shards": 2})
    run_local(cfg, "sqlite:///spy.db", tmp_path / "kfp")
    records: dict[str, list[dict]] = {}
    for path in spy.glob("*.json"):
        entry = json.loads(path.read_text())
        records.setdefault(entry["stage"], []).append(entry)
    stage_of = {"check": "deploy", "ingest": "ingest", "preprocess": "preprocess", "merge_shards": "preprocess",
                "tune": "tune", "train": "train", "evaluate": "evaluate", "register": "registry", "deploy": "deploy"}
    assert set(records) == set(stage_of)
    for task, stage in stage_of.items():
        for entry in records[task]:
            assert entry["config"] == getattr(cfg, stage).model_dump(mode="json"), task
    assert records["tune"][0]["train_config"] == cfg.train.model_dump(mode="json")
    assert sorted((r["kwargs"]["shard"], r["kwargs"]["shards"]) for r in records["ingest"]) == [(0, 2), (1, 2)]
    assert len(records["preprocess"]) == 2 and len(records["merge_shards"]) == 1
    for task in ("tune", "train", "evaluate"):
        assert records[task][0]["kwargs"]["experiment"] == cfg.registry.experiment
        assert records[task][0]["kwargs"]["tracking_uri"] == "sqlite:///spy.db"
    assert records["deploy"][0]["kwargs"]["tracking_uri"] == "sqlite:///spy.db"
    assert records["check"][0]["kwargs"]["tracking_uri"] == "sqlite:///spy.db"
    # Evaluation scores the originals the merged dataset keeps: it is given no ingest output.
    assert not records["evaluate"][0]["kwargs"].get("originals")


@pytest.mark.slow
def test_whole_pipeline_runs_locally_and_serves_the_registered_model(synth_dir, tmp_path, isolated_home):
    """Integration: moto S3 -> kfp local runner -> MLflow registry -> local model server."""
    from mlflow import MlflowClient

    from bincounter.serving.client import count_images
    from bincounter.deploy import stop
    from bincounter_demo.s3server import LocalS3
    from bincounter_demo.synth import generate
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
            shards=2,
        )
        try:
            run_local(cfg, tracking_uri, tmp_path / "kfp")
            client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
            champion = client.get_model_version_by_alias("bincounter", "champion")
            tags = champion.tags
            assert {"promotion.decision", "lineage.data_manifest_sha256", "lineage.pipeline_run_id",
                    "lineage.training_run_id", "lineage.git_commit"} <= set(tags), tags
            assert champion.tags["promotion.decision"] == "promoted"
            # The version carries the accuracy the evaluate step measured (its metrics.json, logged
            # to the training run), and that figure is its own confusion matrix's diagonal share.
            evaluated = json.loads(Path(client.download_artifacts(
                champion.tags["lineage.training_run_id"], "evaluation/metrics.json", str(tmp_path))).read_text())
            assert float(champion.tags["metric.accuracy"]) == evaluated["accuracy"]
            cm = evaluated["confusion_matrix"]
            assert evaluated["accuracy"] == pytest.approx(sum(cm[i][i] for i in range(len(cm))) / sum(map(sum, cm)))
            assert champion.tags["lineage.data_manifest_sha256"] != "None"
            assert champion.tags["lineage.pipeline_run_id"] not in ("", "none")
            run = client.get_run(champion.tags["lineage.training_run_id"])
            prefixes = {key.split(".")[0] for key in run.data.params}
            assert {"ingest", "preprocess", "train", "evaluate", "register"} <= prefixes
            assert "test_accuracy" in run.data.metrics and "val_accuracy" in run.data.metrics
            # Scored as served (the test originals both preprocess shards kept), with the shard path beside.
            assert {"test_shards_accuracy", "test_shards_differ", "test_served_refused"} <= set(run.data.metrics)
            state = json.loads((isolated_home / "deployments" / "bincounter.json").read_text())
            result = count_images(state["url"], [src / "bin-images" / "00001.jpg"])[0]
            assert 0 <= result["count"] <= 5 and len(result["probabilities"]) == 6
        finally:
            stop("local", "bincounter")
