"""The full-data recipe (docs/recipe.md): the command it documents compiles,
asks for its GPUs and carries its settings; its PyTorchJob overlay trains with the same
settings; the model settings it lists as the current defaults are the defaults.

The command and the table are read from docs/recipe.md, between ``<!-- recipe:NAME -->`` markers.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

from bincounter.config import PreprocessConfig, TrainConfig
from tests.deploy.test_manifests import MANIFESTS, build, find, kubectl  # noqa: F401 - kubectl is a fixture

RECIPE = Path(__file__).resolve().parents[2] / "docs" / "recipe.md"
OVERLAY = MANIFESTS / "training" / "full-data"
# What the recipe scales: each must be set by its command, not left to the CPU-sized defaults.
SCALING = ("--train.batch-size", "--train.lr", "--train.warmup-epochs", "--train.epochs", "--train.image-size",
           "--train.amp", "--train.workers", "--preprocess.image-size", "--preprocess.workers",
           "--preprocess.val-fraction", "--preprocess.test-fraction", "--shards", "--cluster.gpus",
           "--cluster.shm-size", "--cluster.train-resources.cpu-request", "--cluster.train-resources.cpu-limit",
           "--cluster.train-resources.memory-request", "--cluster.train-resources.memory-limit")


def readme_block(name: str) -> str:
    """docs/recipe.md's text between ``<!-- recipe:NAME -->`` and ``<!-- /recipe:NAME -->``."""
    found = re.search(rf"<!-- recipe:{name} -->\n(.*?)<!-- /recipe:{name} -->", RECIPE.read_text(), re.S)
    assert found, f"docs/recipe.md has no <!-- recipe:{name} --> ... <!-- /recipe:{name} --> block"
    return found.group(1)


def recipe_argv() -> list[str]:
    """The recipe's command as the shell splits it (one fenced block, backslash continuations)."""
    block = readme_block("command").strip()
    assert block.startswith("```bash\n") and block.endswith("```"), "the recipe's command is one ```bash block"
    return shlex.split(block.removeprefix("```bash\n").removesuffix("```").replace("\\\n", " "))


def options(argv: list[str]) -> dict[str, str]:
    """``--name value`` pairs; the recipe spells every option with its value."""
    assert len(argv) % 2 == 0 and all(a.startswith("--") for a in argv[::2]), argv
    out = dict(zip(argv[::2], argv[1::2]))
    assert len(out) == len(argv) // 2, "an option is given twice"
    return out


def stage(opts: dict[str, str], prefix: str) -> dict[str, str]:
    """One stage's options as config fields: ``--train.batch-size 128`` -> ``{"batch_size": "128"}``."""
    return {k.removeprefix(prefix).replace("-", "_"): v for k, v in opts.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def recipe() -> dict[str, str]:
    argv = recipe_argv()
    assert argv[:3] == ["bincounter", "pipeline", "compile"], argv[:3]
    return options(argv[3:])


@pytest.fixture(scope="module")
def compiled(recipe, tmp_path_factory):
    """The recipe's command run through the CLI's compile path, into a temporary folder."""
    from bincounter.cli import main

    out = tmp_path_factory.mktemp("recipe") / "pipeline.yaml"
    args = [a for k, v in {**recipe, "--out": str(out)}.items() for a in (k, v)]
    main(["pipeline", "compile", *args])
    spec, platform = list(yaml.safe_load_all(out.read_text()))[:2]
    executors = {k.removeprefix("exec-"): v["container"] for k, v in spec["deploymentSpec"]["executors"].items()}
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounts = {k.removeprefix("exec-"): v for k, v in kubernetes.items()}
    return spec, executors, mounts


def test_the_recipe_sets_every_scaling_setting_and_no_model_choice(recipe) -> None:
    missing = [name for name in SCALING if name not in recipe]
    assert not missing, f"the recipe's command leaves these to the CPU-sized defaults: {missing}"
    # The model choices are TrainConfig's and PreprocessConfig's defaults (one place to change them).
    chosen = {f"--train.{f.replace('_', '-')}" for f in current_defaults()["train"]}
    chosen |= {f"--preprocess.{f.replace('_', '-')}" for f in current_defaults()["preprocess"]}
    assert not chosen & set(recipe), f"model choices belong in the config defaults: {chosen & set(recipe)}"
    # Originals are packed at the size the model trains on (else each epoch resamples them).
    assert recipe["--preprocess.image-size"] == recipe["--train.image-size"]


def test_the_readme_command_compiles_with_its_gpus_and_settings(recipe, compiled) -> None:
    spec, executors, mounts = compiled
    gpus = recipe["--cluster.gpus"]
    assert int(gpus) > 1
    train = executors["train"]
    assert train["resources"]["accelerator"]["resourceCount"] == gpus
    assert train["image"].endswith("-cuda")
    resources = stage(recipe, "--cluster.train-resources.")
    assert train["resources"]["cpuRequest"] == float(resources["cpu_request"])
    assert train["resources"]["cpuLimit"] == float(resources["cpu_limit"])
    assert train["resources"]["memoryRequest"] == float(resources["memory_request"].removesuffix("G"))
    assert train["resources"]["memoryLimit"] == float(resources["memory_limit"].removesuffix("G"))
    assert mounts["train"]["emptyDirMounts"][0]["sizeLimit"] == recipe["--cluster.shm-size"]

    # The recipe's stage settings are the compiled parameters' defaults: what a run gets.
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name, model in (("train", TrainConfig), ("preprocess", PreprocessConfig)):
        expected = model.model_validate(stage(recipe, f"--{name}."))
        assert params[name]["defaultValue"] == expected.params(), name
        assert expected != model(), name
    assert params["shards"]["defaultValue"] == int(recipe["--shards"])


def test_the_recipe_learning_rate_follows_the_square_root_rule(recipe) -> None:
    """AdamW's learning rate grows with the square root of the global batch from the defaults'
    (lr, batch) pair, which the CPU runs measured."""
    default = TrainConfig()
    global_batch = int(recipe["--train.batch-size"]) * int(recipe["--cluster.gpus"])
    expected = default.lr * math.sqrt(global_batch / default.batch_size)
    assert float(recipe["--train.lr"]) == pytest.approx(expected, rel=0.01), (
        f"lr {recipe['--train.lr']} for a global batch of {global_batch}: the rule gives {expected:.4g} from the "
        f"defaults' lr {default.lr} at batch {default.batch_size}; update docs/recipe.md's command and its arithmetic")


def current_defaults() -> dict[str, dict[str, str]]:
    """The recipe's table of model settings the recipe takes from the config: stage -> field -> value."""
    out: dict[str, dict[str, str]] = {"train": {}, "preprocess": {}}
    for row in readme_block("defaults").splitlines():
        found = re.match(r"\|\s*`--(train|preprocess)\.([a-z0-9-]+)`\s*\|\s*`([^`]*)`\s*\|", row)
        if found:
            out[found.group(1)][found.group(2).replace("-", "_")] = found.group(3)
    assert out["train"] and out["preprocess"], "docs/recipe.md's recipe:defaults table lists no settings"
    return out


def test_the_current_defaults_the_readme_lists_are_the_defaults() -> None:
    configs = {"train": TrainConfig(), "preprocess": PreprocessConfig()}
    for name, fields in current_defaults().items():
        for field, text in fields.items():
            actual = getattr(configs[name], field)
            assert text == str(actual), (
                f"docs/recipe.md lists --{name}.{field.replace('_', '-')} = {text!r} as the current default, "
                f"the config says {actual!r}: update docs/recipe.md's table")


def test_the_pytorchjob_overlay_trains_with_the_recipe_settings(recipe, kubectl: str) -> None:  # noqa: F811
    job = find(build(kubectl, OVERLAY), "PyTorchJob", "bincounter-train")
    gpus = recipe["--cluster.gpus"]
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master"}, "the recipe is one node: the Master's torchrun starts every rank"
    assert job["spec"]["nprocPerNode"] == gpus
    pod = specs["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].endswith("-cuda")
    resources = stage(recipe, "--cluster.train-resources.")
    assert container["resources"] == {
        "requests": {"cpu": resources["cpu_request"], "memory": resources["memory_request"]},
        "limits": {"cpu": resources["cpu_limit"], "memory": resources["memory_limit"], "nvidia.com/gpu": int(gpus)},
    }
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": recipe["--cluster.shm-size"]}

    cmd = container["command"]
    assert cmd[0] == "torchrun" and "--nproc-per-node=$(PET_NPROC_PER_NODE)" in cmd
    train_args = cmd[cmd.index("train") + 1:]
    flags = dict(a.removeprefix("--").split("=", 1) for a in train_args)
    assert flags.pop("data").startswith("s3://") and flags.pop("out")
    flags = {k.replace("-", "_"): v for k, v in flags.items()}
    assert flags == stage(recipe, "--train."), "the PyTorchJob's train settings differ from the recipe command's"
