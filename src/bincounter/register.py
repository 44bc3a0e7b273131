"""Register: log the pyfunc, add a model version, and gate its promotion to ``champion``.

Every new version gets the alias ``challenger``. ``champion`` moves to it only when it beats
the current champion on ``cfg.metric`` by ``cfg.min_improvement`` (the first version is
promoted); the decision and its reason are recorded as version tags either way.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import bincounter
from bincounter import tracking
from bincounter.config import RegisterConfig
from bincounter.onnx_export import export_onnx
from bincounter.paths import home

CHALLENGER = "challenger"
CHAMPION = "champion"


@dataclass(frozen=True)
class RegisterResult:
    name: str
    version: str
    model_uri: str  # models:/<name>/<version>
    promoted: bool
    reason: str
    run_id: str


def git_commit() -> str:
    """The commit this code came from ($BINCOUNTER_GIT_COMMIT in images without .git)."""
    if os.environ.get("BINCOUNTER_GIT_COMMIT"):
        return os.environ["BINCOUNTER_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_pyfunc(model_dir: str | Path, example_images: list[bytes]):
    """Log the serving pyfunc into the active run; returns mlflow's ModelInfo."""
    import json

    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    from bincounter.pyfunc import BinCounterModel

    spec = json.loads((Path(model_dir) / "model_spec.json").read_text())
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("long", "count"), ColSpec("string", "label"), ColSpec("double", "confidence"),
                        ColSpec("double", "expected_count"), ColSpec(Array("double"), "probabilities")]),
    )
    # Only the weights and spec travel as artifacts; checkpoints and plots stay with the run.
    artifacts = {"model_dir": str(_serving_files(Path(model_dir)))}
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=BinCounterModel(),
        artifacts=artifacts,
        code_paths=[str(Path(bincounter.__file__).parent)],
        signature=signature,
        # Two rows: the signature is column-based, so no batch size is pinned.
        input_example=pd.DataFrame({"image": example_images[:2]}) if example_images else None,
        pip_requirements=_requirements(),
        metadata={k: spec.get(k) for k in ("class_names", "image_size", "mean", "std", "backbone", "tta", "rot90", "min_count")},
    )


def _serving_files(model_dir: Path) -> Path:
    import shutil
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="bincounter-serving-")) / "model"
    out.mkdir()
    for name in ("model.pt", "model_spec.json"):
        shutil.copy2(model_dir / name, out / name)
    export_onnx(out)  # model.onnx: what the model server runs (bincounter.onnx_export)
    return out


def _requirements() -> list[str]:
    from importlib.metadata import version

    pins = ["torch", "torchvision", "mlflow", "pillow", "numpy", "pandas", "pydantic",
            "efficientnet-lite-pytorch", "webdataset", "tqdm"]
    return [f"{p}=={version(p)}" for p in pins]


def model_card(name: str, version: str, metrics: dict, lineage: dict, spec: dict, decision: str) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()) if isinstance(v, float))
    lin = "\n".join(f"- {k}: `{v}`" for k, v in sorted(lineage.items()))
    return f"""# {name} v{version}

Counts the items in a photo of a warehouse bin taken from above (Amazon Bin Image Dataset style).
Input: raw JPEG/PNG bytes. Output: `count`, `confidence`, `expected_count`, class `probabilities`.

## Model
Backbone `{spec.get('backbone')}`, {spec.get('num_classes')} classes {list(spec.get('class_names', []))},
input {spec.get('image_size')} px, test-time augmentation: {spec.get('tta')} (flips{' and 90-degree rotations' if spec.get('rot90') else ''}).

## Held-out metrics
| metric | value |
|---|---|
{rows}

## Data and lineage
{lin}

## Promotion
{decision}

## Limits
- Trained for counts {spec.get('class_names', ['?'])[0]} to {spec.get('class_names', ['?'])[-1]}; a bin holding more
  is predicted as the largest class (or the overflow class when there is one).
- Accuracy drops on crowded bins, occluded items and bins whose strap tapes hide items; use
  `confidence` to route uncertain bins to a person.
- Evaluated on photos from the same distribution as training; re-evaluate before use on other sites.
"""


def _champion_score(client, name: str, metric: str) -> tuple[str | None, float | None]:
    from mlflow.exceptions import MlflowException

    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    value = champ.tags.get(f"metric.{metric}")
    return champ.version, float(value) if value is not None else None


def decide(new: float | None, current: float | None, cfg: RegisterConfig) -> tuple[bool, str]:
    """Whether a challenger scoring ``new`` replaces a champion scoring ``current``."""
    if current is None:
        return True, "no champion yet: first model is promoted"
    if new is None:
        return False, f"challenger has no '{cfg.metric}' metric; champion kept"
    gain = (new - current) if cfg.greater_is_better else (current - new)
    if gain > cfg.min_improvement:
        return True, f"{cfg.metric} {new:.4f} beats champion's {current:.4f} by {gain:.4f} (> {cfg.min_improvement})"
    return False, f"{cfg.metric} {new:.4f} does not beat champion's {current:.4f} by more than {cfg.min_improvement}"


def register(cfg: RegisterConfig, model_dir: str | Path, metrics: dict[str, float], *, run_id: str | None = None,
             lineage: dict[str, str] | None = None, example_images: list[bytes] | None = None) -> RegisterResult:
    """Log, register, tag, and gate. ``run_id`` is the training run to attach the model to."""
    import json

    import mlflow
    from filelock import FileLock
    from mlflow import MlflowClient

    tracking.configure(cfg.tracking_uri, cfg.experiment)
    spec = json.loads((Path(model_dir) / "model_spec.json").read_text())
    lineage = {"git_commit": git_commit(), **(lineage or {})}
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register") as run:
        mlflow.log_params({k: str(v) for k, v in cfg.flat("register.").items()})
        info = log_pyfunc(model_dir, example_images or [])
        tracking.log_metrics({f"test_{k}": v for k, v in metrics.items()})
        mlflow.set_tags({f"lineage.{k}": v for k, v in lineage.items()})
    client = MlflowClient()
    version = mlflow.register_model(info.model_uri, cfg.model_name,
                                    tags={**{f"metric.{k}": str(v) for k, v in metrics.items()},
                                          **{f"lineage.{k}": v for k, v in lineage.items()},
                                          "lineage.training_run_id": run.info.run_id}).version
    # Read-compare-move must not interleave with another registration: hold a lock.
    home().mkdir(parents=True, exist_ok=True)
    with FileLock(str(home() / f"registry-{cfg.model_name}.lock"), timeout=300):
        client.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
        champ_version, champ_score = _champion_score(client, cfg.model_name, cfg.metric)
        promoted, reason = decide(metrics.get(cfg.metric), champ_score, cfg)
        if champ_version is not None:
            reason += f" (champion was v{champ_version})"
        if promoted:
            client.set_registered_model_alias(cfg.model_name, CHAMPION, version)
    client.set_model_version_tag(cfg.model_name, version, "promotion.decision", "promoted" if promoted else "kept")
    client.set_model_version_tag(cfg.model_name, version, "promotion.reason", reason)
    card = model_card(cfg.model_name, version, metrics, lineage, spec, reason)
    client.update_model_version(cfg.model_name, version, description=card)
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_text(card, f"model_card_v{version}.md")
    return RegisterResult(name=cfg.model_name, version=str(version), model_uri=f"models:/{cfg.model_name}/{version}",
                          promoted=promoted, reason=reason, run_id=run.info.run_id)
