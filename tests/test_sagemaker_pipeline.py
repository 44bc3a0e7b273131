"""The SageMaker variant of the pipeline compiles with the right steps, parameters and pods."""

from __future__ import annotations

import inspect
import re

import pytest
import yaml

from bincounter.config import SageMakerConfig, SageMakerHostingConfig, SageMakerTrainingConfig, TrainConfig
from pipelines.sagemaker_pipeline import compile_pipeline, make_pipeline

STEPS = {"shard-indices", "ingest", "preprocess", "merge-shards", "sagemaker-train", "evaluate", "register", "sagemaker-deploy"}
ACCOUNT = {"role_arn", "region", "bucket", "data_prefix", "output_prefix", "checkpoint_prefix", "training_image",
           "serving_image"}
PLACEHOLDER = re.compile(r"^\{\{\$\.inputs\.parameters\['pipelinechannel--(\w+)'\]\}\}$")


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    path = compile_pipeline(tmp_path_factory.mktemp("pipeline") / "sagemaker.yaml")
    return yaml.safe_load(path.read_text())


def _tasks(spec: dict) -> dict:
    """Every task of the pipeline, including those inside the dsl.If branch."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_the_steps_are_the_stages_with_sagemaker_training_and_hosting(spec: dict) -> None:
    executors = spec["deploymentSpec"]["executors"]
    assert {name.removeprefix("exec-") for name in executors} == STEPS  # no in-cluster train, tune or deploy
    for executor in executors.values():
        assert executor["container"]["image"] == "ghcr.io/bincounter/bincounter:0.1.0"


def test_no_pod_of_the_pipeline_asks_for_a_gpu(spec: dict) -> None:
    text = yaml.safe_dump(spec)
    assert "accelerator" not in text and "nvidia.com/gpu" not in text
    for executor in spec["deploymentSpec"]["executors"].values():
        assert "accelerator" not in executor["container"].get("resources", {})


def test_the_account_settings_are_pipeline_parameters_with_the_typed_defaults(spec: dict) -> None:
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert ACCOUNT <= set(params)
    # The four an account must supply have no default: the run form asks for them.
    for name in ("role_arn", "bucket", "training_image", "serving_image"):
        assert not params[name].get("isOptional", False)
    defaults = {name: p.default for name, p in inspect.signature(make_pipeline().pipeline_func).parameters.items()
                if p.default is not inspect.Parameter.empty}
    sm = SageMakerConfig()
    for name in set(defaults) & set(SageMakerConfig.model_fields):
        assert defaults[name] == getattr(sm, name), name
    assert TrainConfig.model_validate(defaults["train"]) == TrainConfig()
    assert params["train"]["parameterType"] == "STRUCT"


def _substitute(value, arguments: dict):
    """What KFP does at run time inside a struct argument: each placeholder becomes the text of
    the parameter (JSON for structs, lower-case for booleans)."""
    import json

    if isinstance(value, dict):
        return {k: _substitute(v, arguments) for k, v in value.items()}
    match = PLACEHOLDER.match(value) if isinstance(value, str) else None
    if not match:
        return value
    arg = arguments[match[1]]
    return json.dumps(arg) if isinstance(arg, (dict, bool)) else str(arg)


@pytest.mark.parametrize(("task", "model"), [("sagemaker-train", SageMakerTrainingConfig),
                                             ("sagemaker-deploy", SageMakerHostingConfig)])
def test_each_sagemaker_step_gets_one_struct_its_config_validates(spec: dict, task: str, model) -> None:
    tasks = _tasks(spec)
    inputs = tasks[task]["inputs"]["parameters"]
    component = spec["components"][tasks[task]["componentRef"]["name"]]
    assert list(component["inputDefinitions"]["parameters"]) == ["config"]
    assert component["inputDefinitions"]["parameters"]["config"]["parameterType"] == "STRUCT"
    struct = inputs["config"]["runtimeValue"]["constant"]
    arguments = {name: p.default for name, p in inspect.signature(make_pipeline().pipeline_func).parameters.items()}
    arguments.update(role_arn="arn:aws:iam::123456789012:role/sm", bucket="b",
                     training_image="123456789012.dkr.ecr.us-east-1.amazonaws.com/bincounter:cuda",
                     serving_image="123456789012.dkr.ecr.us-east-1.amazonaws.com/bincounter:cpu", spot=False)
    cfg = model.model_validate(_substitute(struct, arguments))
    assert cfg.sagemaker.role_arn == "arn:aws:iam::123456789012:role/sm" and cfg.sagemaker.spot is False
    assert cfg.sagemaker.max_run_seconds == SageMakerConfig().max_run_seconds
    if model is SageMakerTrainingConfig:
        assert cfg.train == TrainConfig()
    # Every placeholder in the struct is fed by the pipeline parameter of its name (inside the
    # dsl.If branch, through the branch's input of the same channel).
    for channel in re.findall(r"pipelinechannel--(\w+)", yaml.safe_dump(struct)):
        source = inputs[f"pipelinechannel--{channel}"]["componentInputParameter"]
        assert source in (channel, f"pipelinechannel--{channel}")
        assert channel in spec["root"]["inputDefinitions"]["parameters"]


def test_hosting_runs_only_when_enabled_and_is_never_cached(spec: dict) -> None:
    tasks = _tasks(spec)
    assert tasks["sagemaker-deploy"]["cachingOptions"].get("enableCache", False) is False
    assert tasks["register"]["cachingOptions"].get("enableCache", False) is False
    condition = next(t for t in spec["root"]["dag"]["tasks"].values() if "triggerPolicy" in t)
    assert "deploy_enabled" in condition["triggerPolicy"]["condition"]


def test_the_cli_compiles_the_sagemaker_backend_with_the_stage_options_as_defaults(tmp_path) -> None:
    import subprocess
    import sys

    out = tmp_path / "sm.yaml"
    subprocess.run([sys.executable, "-m", "bincounter.cli", "pipeline", "compile", "--backend", "sagemaker",
                    "--out", str(out), "--train.epochs", "3"], check=True, capture_output=True, timeout=300)
    spec = yaml.safe_load(out.read_text())
    assert "exec-sagemaker-train" in spec["deploymentSpec"]["executors"]
    assert spec["root"]["inputDefinitions"]["parameters"]["train"]["defaultValue"]["epochs"] == 3


def test_evaluation_gets_the_original_photos_of_every_ingest_shard(spec: dict) -> None:
    """As in the main pipeline: the served path is scored on the ingest outputs, collected over the shards."""
    originals = _tasks(spec)["evaluate"]["inputs"]["artifacts"]["originals"]["taskOutputArtifact"]
    loop = spec["components"][spec["root"]["dag"]["tasks"][originals["producerTask"]]["componentRef"]["name"]]
    assert loop["dag"]["outputs"]["artifacts"][originals["outputArtifactKey"]]["artifactSelectors"] == \
        [{"outputArtifactKey": "raw", "producerSubtask": "ingest"}]
