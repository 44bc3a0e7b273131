"""bincounter.sagemaker_entry: SageMaker's training contract on a temporary /opt/ml.

The resume test runs the entry point as SageMaker does (a process of its own), kills it with
SIGKILL in the middle of an epoch, starts it again on a fresh scratch folder and checks that it
continued from the checkpoint folder instead of starting over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bincounter import sagemaker_entry as entry
from bincounter.config import TrainConfig

SRC = Path(__file__).resolve().parents[1] / "src"

# Small batches make an epoch long enough (dozens of steps) to be killed in its middle.
JOB_TRAIN = TrainConfig(backbone="tiny_cnn", pretrained="none", image_size=64, epochs=4, batch_size=8, lr=3e-3,
                        workers=0, freeze_early=0, progress=False, tta=False, ema_decay=0.0,
                        early_stopping_patience=0)


def make_layout(root: Path, data_dir: Path | None, cfg: TrainConfig | None = JOB_TRAIN) -> entry.Layout:
    layout = entry.Layout(root)
    layout.hyperparameters.parent.mkdir(parents=True)
    if cfg is not None:
        layout.hyperparameters.write_text(json.dumps(entry.to_hyperparameters(cfg)))
    if data_dir is not None:
        shutil.copytree(data_dir, layout.channel())
    return layout


# --------------------------------------------------------------------------- hyperparameters


def test_hyperparameters_are_strings_and_parse_back_to_the_same_config() -> None:
    cfg = JOB_TRAIN.model_copy(update={"lr": 0.00125, "rot90": True, "amp": "bf16"})
    hp = entry.to_hyperparameters(cfg)
    assert all(isinstance(v, str) for v in hp.values())
    assert hp["epochs"] == "4" and hp["rot90"] == "true" and hp["backbone"] == "tiny_cnn"
    assert set(hp) == set(TrainConfig.model_fields) - {"checkpoint_uri"}
    assert entry.parse_hyperparameters(json.loads(json.dumps(hp))) == cfg


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs": "many"}, "epochs"),
        ({"learning_rate": "0.1"}, "learning_rate"),  # not a TrainConfig field: refused, not ignored
        ({"backbone": "resnet9000"}, "backbone"),
        ({"checkpoint_uri": "s3://elsewhere"}, "checkpoint folder"),
    ],
)
def test_bad_hyperparameters_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        entry.parse_hyperparameters(values)


def test_the_job_checkpoints_to_the_layouts_folder(tmp_path: Path) -> None:
    layout = make_layout(tmp_path, None)
    assert entry.read_config(layout).checkpoint_uri == str(tmp_path / "checkpoints")


# --------------------------------------------------------------------------- failures


def test_a_missing_channel_becomes_the_failure_reason(tmp_path: Path) -> None:
    layout = make_layout(tmp_path, None)
    assert entry.run(layout) == 1
    reason = layout.failure.read_text()
    assert reason.startswith("FileNotFoundError: input channel 'training'")
    assert "dataset.json" in reason.splitlines()[0]
    assert not layout.model.exists()


def test_bad_hyperparameters_become_the_failure_reason(tmp_path: Path) -> None:
    layout = make_layout(tmp_path, None, cfg=None)
    layout.hyperparameters.write_text(json.dumps({"epochs": "0"}))
    assert entry.run(layout) == 1
    first = layout.failure.read_text().splitlines()[0]
    assert first.startswith("ValidationError") and "epochs" in layout.failure.read_text()


def test_more_than_one_instance_is_refused(tmp_path: Path, data_dir: Path) -> None:
    layout = make_layout(tmp_path, data_dir)
    layout.resource_config.write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1", "algo-2"]}))
    assert entry.run(layout) == 1
    assert "one instance" in layout.failure.read_text()


def test_only_the_train_argument_is_accepted() -> None:
    assert entry.main(["serve"]) == 2


# --------------------------------------------------------------------------- metrics


def parse_metrics(text: str) -> dict[str, list[float]]:
    """What SageMaker does with MetricDefinitions: each log line searched, the first group kept."""
    found: dict[str, list[float]] = {d["Name"]: [] for d in entry.METRIC_DEFINITIONS}
    for line in text.splitlines():
        for d in entry.METRIC_DEFINITIONS:
            match = re.search(d["Regex"], line)
            if match:
                found[d["Name"]].append(float(match.group(1)))
    return found


def test_metric_regexes_keep_names_apart() -> None:
    text = ("epoch=3 val_accuracy=0.8125 val_rmse=0.5000 train_loss=1.2e-01\n"
            "epoch 4/8: 100%|#####| loss=0.3\n"
            "best_epoch=3 best_val_accuracy=0.8125 best_val_rmse=0.5000\n")
    found = parse_metrics(text)
    assert found["epoch"] == [3.0]
    assert found["val_accuracy"] == [0.8125]  # not also best_val_accuracy's value
    assert found["train_loss"] == [0.12]
    assert found["best_epoch"] == [3.0] and found["best_val_rmse"] == [0.5]


def test_metric_regexes_use_no_engine_specific_syntax() -> None:
    for definition in entry.METRIC_DEFINITIONS:
        for construct in ("(?<", "(?=", "(?!", "(?P"):  # look-arounds and named groups
            assert construct not in definition["Regex"]
        assert re.compile(definition["Regex"]).groups == 1


def test_metric_definitions_satisfy_the_sagemaker_api_model() -> None:
    import botocore.session

    api = botocore.session.get_session().get_service_model("sagemaker")
    shape = api.shape_for("MetricDefinition")
    for definition in entry.METRIC_DEFINITIONS:
        assert set(definition) == set(shape.members)
        assert len(definition["Regex"]) <= shape.members["Regex"].metadata["max"]


# --------------------------------------------------------------------------- kill and resume


def _start(layout: entry.Layout, scratch: Path) -> subprocess.Popen:
    env = {**os.environ, entry.ROOT_ENV: str(layout.root), "TMPDIR": str(scratch), "PYTHONPATH": str(SRC),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the container has no MLflow: the component logs the metrics
    return subprocess.Popen([sys.executable, "-m", "bincounter.sagemaker_entry", "train"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _checkpoint_epoch(layout: entry.Layout) -> int | None:
    path = layout.checkpoints / "checkpoint.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"] if path.exists() else None


@pytest.mark.slow
def test_killed_mid_epoch_the_job_resumes_from_its_checkpoint_folder(tmp_path: Path, data_dir: Path) -> None:
    layout = make_layout(tmp_path / "ml", data_dir)
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    first = _start(layout, scratch)
    try:
        deadline = time.monotonic() + 240
        # Wait for epoch 2's checkpoint (epoch index 1) to reach the checkpoint folder, then kill
        # the process while epoch 3 is under way.
        while _checkpoint_epoch(layout) != 1:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "epoch 2 never finished"
            time.sleep(0.02)
        assert first.poll() is None, "the job ended before it could be interrupted"
        first.send_signal(signal.SIGKILL)
        out1, _ = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == -signal.SIGKILL
    assert [int(e) for e in re.findall(r"^epoch=(\d+) ", out1, re.M)] == [1, 2]  # epoch 3 never finished
    assert not layout.model.exists() and not layout.failure.exists()

    second = _start(layout, scratch)
    out2, err2 = second.communicate(timeout=300)
    assert second.returncode == 0, err2

    assert "resumed at epoch 3" in err2
    metrics = parse_metrics(out2)
    assert metrics["epoch"] == [3.0, 4.0]  # continued at epoch 3, not restarted at 1
    assert len(metrics["val_accuracy"]) == 2 and len(metrics["train_loss"]) == 2
    assert len(metrics["best_val_accuracy"]) == 1
    history = json.loads((layout.model / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # the first run's epochs came back with the checkpoint
    assert _checkpoint_epoch(layout) == 3

    # The model folder is what evaluate and register read.
    from bincounter.predictor import Predictor

    assert sorted(p.name for p in layout.model.iterdir()) == sorted([*entry.MODEL_FILES, "train_config.json"])
    predictor = Predictor.from_dir(layout.model)
    assert predictor.spec.backbone == "tiny_cnn"
    assert TrainConfig.model_validate_json((layout.model / "train_config.json").read_text()).epochs == 4
    # The killed run's scratch; the finished run removed its own (torch may keep caches of its own there).
    assert len(list(scratch.glob("bincounter-train-*"))) == 1


def test_an_unwritable_failure_file_still_exits_non_zero(tmp_path: Path, capsys) -> None:
    layout = make_layout(tmp_path, None)
    (tmp_path / "output").write_text("a file where the output folder should be")
    assert entry.run(layout) == 1
    err = capsys.readouterr().err
    assert "FileNotFoundError: input channel" in err and "could not write" in err
