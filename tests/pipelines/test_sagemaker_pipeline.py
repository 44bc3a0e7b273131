"""The SageMaker variant of the pipeline compiles with the right steps, parameters and pods."""

from __future__ import annotations

import inspect

import pytest
import yaml
from pydantic import ValidationError

from bincounter.config import PipelineConfig, SageMakerConfig, TrainConfig
from pipelines.bincounter_pipeline import make_pipeline as make_main_pipeline
from pipelines.sagemaker_pipeline import compile_pipeline

STEPS = {"sagemaker-check", "shard-indices", "ingest", "preprocess", "merge-shards", "sagemaker-train", "evaluate",
         "register", "sagemaker-deploy"}
PARAMETERS = {"sagemaker", "ingest", "preprocess", "train", "evaluate", "registry", "shards", "deploy_enabled",
              "deploy_model_uri", "tracking_uri", "experiment"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    path = compile_pipeline(tmp_path_factory.mktemp("pipeline") / "sagemaker.yaml")
    return first_document(path)


def first_document(path) -> dict:
    """The pipeline spec (the second YAML document is its kfp-kubernetes platform spec)."""
    return next(yaml.safe_load_all(path.read_text()))


def _tasks(spec: dict) -> dict:
    """Every task of the pipeline, including those inside the dsl.If branch."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def _source(inputs: dict, name: str) -> str:
    """The pipeline parameter feeding a task input (directly, or through a dsl.If branch's input)."""
    return inputs[name]["componentInputParameter"].removeprefix("pipelinechannel--")


def test_the_steps_are_the_stages_with_sagemaker_training_and_hosting(spec: dict) -> None:
    executors = spec["deploymentSpec"]["executors"]
    assert {name.removeprefix("exec-") for name in executors} == STEPS  # no in-cluster train, tune or deploy
    assert set(spec["root"]["dag"]["tasks"]["sagemaker-train"]["dependentTasks"]) >= {"sagemaker-check"}
    for executor in executors.values():
        assert executor["container"]["image"] == "ghcr.io/bincounter/bincounter:0.1.0"


def test_no_pod_of_the_pipeline_asks_for_a_gpu(spec: dict) -> None:
    text = yaml.safe_dump(spec)
    assert "accelerator" not in text and "nvidia.com/gpu" not in text
    for executor in spec["deploymentSpec"]["executors"].values():
        assert "accelerator" not in executor["container"].get("resources", {})


def test_the_account_is_one_struct_parameter_with_the_typed_defaults(spec: dict) -> None:
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == PARAMETERS  # no account field of its own beside the struct
    for name in ("sagemaker", "ingest", "preprocess", "train", "evaluate", "registry"):
        assert params[name]["parameterType"] == "STRUCT", name
    assert SageMakerConfig.model_validate(params["sagemaker"]["defaultValue"]) == SageMakerConfig()
    assert TrainConfig.model_validate(params["train"]["defaultValue"]) == TrainConfig()


def test_compile_time_account_settings_become_the_structs_default(tmp_path) -> None:
    sm = SageMakerConfig(region="eu-west-1", bucket="b", role_arn="arn:aws:iam::123456789012:role/sm",
                         instance_count=3, spot=False)
    path = compile_pipeline(tmp_path / "sm.yaml", PipelineConfig(train=TrainConfig(epochs=3)), sm)
    params = first_document(path)["root"]["inputDefinitions"]["parameters"]
    assert SageMakerConfig.model_validate(params["sagemaker"]["defaultValue"]) == sm
    assert params["train"]["defaultValue"]["epochs"] == 3


@pytest.mark.parametrize(("task", "inputs"), [
    ("sagemaker-train", {"config": "train", "sagemaker": "sagemaker", "tracking_uri": "tracking_uri",
                         "experiment": "experiment"}),
    ("sagemaker-deploy", {"sagemaker": "sagemaker", "model_uri": "deploy_model_uri", "tracking_uri": "tracking_uri"}),
])
def test_each_sagemaker_step_gets_the_pipelines_structs_as_they_are(spec: dict, task: str, inputs: dict) -> None:
    tasks = _tasks(spec)
    component = spec["components"][tasks[task]["componentRef"]["name"]]
    declared = component["inputDefinitions"]["parameters"]
    assert set(declared) == set(inputs)
    assert declared["sagemaker"]["parameterType"] == "STRUCT"
    for name, parameter in inputs.items():
        assert _source(tasks[task]["inputs"]["parameters"], name) == parameter, name


@pytest.mark.parametrize(("module", "struct"), [("sagemaker_train", "config"), ("sagemaker_train", "sagemaker"),
                                                ("sagemaker_deploy", "sagemaker")])
def test_a_misspelled_field_fails_in_the_component_before_any_call(module: str, struct: str) -> None:
    import importlib

    component = getattr(importlib.import_module(f"components.{module}"), module)
    given = {"config": {}, "sagemaker": {}, "tracking_uri": "", "experiment": "e", "model_uri": "",
             struct: {"instance_cuont": 2}}  # artifacts stay None: nothing may touch them first
    kwargs = {name: given.get(name) for name in inspect.signature(component.python_func).parameters}
    with pytest.raises(ValidationError, match="instance_cuont"):
        component.python_func(**kwargs)


def _wiring(spec: dict, name: str, producer: str) -> dict:
    """A task's inputs with the task that made its artifacts named generically."""
    task = yaml.safe_dump(_tasks(spec)[name]["inputs"]).replace(f"producerTask: {producer}\n", "producerTask: TRAIN\n")
    return yaml.safe_load(task)


def test_evaluate_and_register_are_wired_as_in_the_main_pipeline(spec: dict, tmp_path) -> None:
    from kfp import compiler

    compiler.Compiler().compile(make_main_pipeline(), str(tmp_path / "main.yaml"))
    main = first_document(tmp_path / "main.yaml")
    for name in ("evaluate", "register"):
        assert _wiring(spec, name, "sagemaker-train") == _wiring(main, name, "train"), name


def test_hosting_runs_only_when_enabled_and_is_never_cached(spec: dict) -> None:
    tasks = _tasks(spec)
    assert tasks["sagemaker-deploy"]["cachingOptions"].get("enableCache", False) is False
    assert tasks["register"]["cachingOptions"].get("enableCache", False) is False
    condition = next(t for t in spec["root"]["dag"]["tasks"].values() if "triggerPolicy" in t)
    assert "deploy_enabled" in condition["triggerPolicy"]["condition"]


def test_the_cli_compiles_the_sagemaker_backend_with_the_options_as_defaults(tmp_path) -> None:
    import subprocess
    import sys

    out = tmp_path / "sm.yaml"
    subprocess.run([sys.executable, "-m", "bincounter.cli", "pipeline", "compile", "--backend", "sagemaker",
                    "--out", str(out), "--train.epochs", "3", "--sagemaker.region", "eu-west-1",
                    "--sagemaker.instance-count", "2"], check=True, capture_output=True, timeout=300)
    spec = first_document(out)
    assert "exec-sagemaker-train" in spec["deploymentSpec"]["executors"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["train"]["defaultValue"]["epochs"] == 3
    assert SageMakerConfig.model_validate(params["sagemaker"]["defaultValue"]) == SageMakerConfig(
        region="eu-west-1", instance_count=2)
    refused = subprocess.run([sys.executable, "-m", "bincounter.cli", "pipeline", "compile", "--out",
                              str(tmp_path / "k.yaml"), "--sagemaker.region", "eu-west-1"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--backend sagemaker" in refused.stderr
    assert not (tmp_path / "k.yaml").exists()


def test_evaluation_reads_the_merged_dataset_not_every_ingest_output(spec: dict) -> None:
    """As in the main pipeline: the served path is scored on the test originals the dataset keeps."""
    inputs = _tasks(spec)["evaluate"]["inputs"]["artifacts"]
    assert set(inputs) == {"model", "data"}
    assert inputs["data"]["taskOutputArtifact"]["producerTask"] == "merge-shards"
