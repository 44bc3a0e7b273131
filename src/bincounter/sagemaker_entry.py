"""SageMaker's training contract: what ``docker run <image> train`` does in a training job.

SageMaker lays a job out under ``/opt/ml`` (settable here with ``$BINCOUNTER_SAGEMAKER_ROOT``,
so tests run the same code on a temporary folder):

    input/config/hyperparameters.json   every TrainConfig field we send, each value a string
    input/data/training/                the "training" channel: one preprocess output
                                        (dataset.json and the train/val/test shards)
    checkpoints/                        synced with CheckpointConfig.S3Uri; restored before a
                                        spot-interrupted job restarts on a new instance
    model/                              tarred to <output>/<job>/output/model.tar.gz
    output/failure                      the job's FailureReason when we exit non-zero

Training runs in a scratch folder; each epoch's checkpoint is mirrored to ``checkpoints/``
(``TrainConfig.checkpoint_uri``), so a rerun on a fresh machine resumes at the epoch it lost.
At the end the serving files (the same as a local training folder's, without the optimizer
state) are copied to ``model/``, so evaluate and register read an unpacked model.tar.gz
exactly like a local training output. Metrics are printed as ``name=value`` lines, which
``METRIC_DEFINITIONS`` (the job's MetricDefinitions) parse.

Run as ``python -m bincounter.sagemaker_entry train``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

from bincounter.config import TrainConfig

ROOT_ENV = "BINCOUNTER_SAGEMAKER_ROOT"
DEFAULT_ROOT = "/opt/ml"
DATA_CHANNEL = "training"
# What the model folder (and so model.tar.gz) holds: what Predictor.from_dir and register read,
# plus the training history and curves. Not checkpoint.pt: its optimizer state triples the size.
MODEL_FILES = ("model.pt", "model_spec.json", "history.json", "plots")
# SageMaker shows at most this much of output/failure as the job's FailureReason.
FAILURE_REASON_CHARS = 1024

_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
# The lines train() prints per epoch ("epoch=3 val_accuracy=0.8125 val_rmse=0.5 train_loss=0.7")
# and the summary line printed here. The word boundary keeps "val_accuracy" from matching inside
# "best_val_accuracy"; \b and plain groups, not look-behinds, because SageMaker does not say
# which regex engine reads the log.
METRIC_NAMES = ("epoch", "val_accuracy", "val_rmse", "train_loss", "best_epoch", "best_val_accuracy", "best_val_rmse")
METRIC_DEFINITIONS: tuple[dict[str, str], ...] = tuple(
    {"Name": name, "Regex": rf"\b{name}={_NUMBER}"} for name in METRIC_NAMES
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """The folders of a SageMaker training container, under one root."""

    root: Path

    @classmethod
    def from_env(cls) -> "Layout":
        return cls(Path(os.environ.get(ROOT_ENV, DEFAULT_ROOT)))

    @property
    def hyperparameters(self) -> Path:
        return self.root / "input" / "config" / "hyperparameters.json"

    @property
    def resource_config(self) -> Path:
        return self.root / "input" / "config" / "resourceconfig.json"

    def channel(self, name: str = DATA_CHANNEL) -> Path:
        return self.root / "input" / "data" / name

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def failure(self) -> Path:
        return self.root / "output" / "failure"


def to_hyperparameters(cfg: TrainConfig) -> dict[str, str]:
    """TrainConfig as SageMaker HyperParameters: every set field, every value a string.

    ``checkpoint_uri`` is left out: inside the job the checkpoint folder is fixed by the layout.
    """
    out: dict[str, str] = {}
    for key, value in cfg.model_dump(mode="json", exclude={"checkpoint_uri"}).items():
        if value is None:
            continue
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def parse_hyperparameters(values: dict[str, object]) -> TrainConfig:
    """TrainConfig from hyperparameters.json (strings, as SageMaker writes them).

    Pydantic's lax mode turns "8", "0.001" and "true" into the field's type; an unknown or
    invalid key is an error, not silently dropped.
    """
    if not isinstance(values, dict):
        raise ValueError(f"hyperparameters.json must hold a JSON object, not {type(values).__name__}")
    if "checkpoint_uri" in values:
        raise ValueError("checkpoint_uri is not a hyperparameter: a SageMaker job checkpoints to its checkpoint folder")
    return TrainConfig.model_validate(values)


def read_config(layout: Layout) -> TrainConfig:
    """The job's TrainConfig, checkpointing to the layout's checkpoint folder."""
    path = layout.hyperparameters
    values = json.loads(path.read_text()) if path.exists() else {}
    cfg = parse_hyperparameters(values)
    return cfg.model_copy(update={"checkpoint_uri": str(layout.checkpoints)})


def _check_single_host(layout: Layout) -> None:
    if layout.resource_config.exists():
        hosts = json.loads(layout.resource_config.read_text()).get("hosts", [])
        if len(hosts) > 1:
            raise ValueError(f"this entry point trains on one instance; the job has {len(hosts)} ({hosts})")


def _publish_model(work: Path, model_dir: Path, cfg: TrainConfig) -> None:
    """Copy the serving files into the folder SageMaker tars as model.tar.gz."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        src = work / name
        if src.is_dir():
            shutil.copytree(src, model_dir / name, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, model_dir / name)
    (model_dir / "train_config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))


def run(layout: Layout) -> int:
    """Train once under ``layout``; 0 on success, 1 after writing the failure reason."""
    try:
        from bincounter.train import train

        cfg = read_config(layout)
        _check_single_host(layout)
        data = layout.channel()
        if not (data / "dataset.json").exists():
            raise FileNotFoundError(f"input channel {DATA_CHANNEL!r} ({data}) holds no dataset.json: point it at a "
                                    "preprocess output (s3://<bucket>/<prefix> with dataset.json and the shards)")
        layout.checkpoints.mkdir(parents=True, exist_ok=True)
        # A fresh scratch folder each start, like the new instance a spot restart lands on: the
        # only way back into an interrupted run is the checkpoint folder.
        with tempfile.TemporaryDirectory(prefix="bincounter-train-") as work:
            result = train(cfg, data, work)
            _publish_model(Path(work), layout.model, cfg)
        print(f"best_epoch={result.best_epoch} best_val_accuracy={result.best.get('val_accuracy', 0.0):.4f} "
              f"best_val_rmse={result.best.get('val_rmse', 0.0):.4f}", flush=True)
        return 0
    except Exception as exc:  # every failure becomes the job's FailureReason
        reason = f"{type(exc).__name__}: {exc}"
        detail = traceback.format_exc()
        print(detail, file=sys.stderr, flush=True)  # the job's log has it even if the file cannot be written
        try:
            layout.failure.parent.mkdir(parents=True, exist_ok=True)
            layout.failure.write_text(reason[:FAILURE_REASON_CHARS] + "\n\n" + detail)
        except OSError as write_error:  # e.g. a non-root image user on SageMaker's root-owned /opt/ml
            print(f"could not write {layout.failure}: {write_error}", file=sys.stderr, flush=True)
        return 1


def main(argv: list[str] | None = None) -> int:
    """``train`` (SageMaker's container argument) or no argument: run the training contract."""
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["train"]):
        print(f"usage: python -m bincounter.sagemaker_entry [train]  (got {' '.join(args)!r})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(Layout.from_env())


if __name__ == "__main__":
    sys.exit(main())
