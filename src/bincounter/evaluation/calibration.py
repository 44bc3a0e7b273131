"""How often the model's count was right at a given confidence, on held-out photos.

The evaluate stage writes the reliability bins into ``metrics.json`` and logs that file to
the model's MLflow run as ``evaluation/metrics.json``; a registered version points to that
run. The audit reads it back to say how precise its flags are expected to be.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EVALUATION_ARTIFACT = "evaluation/metrics.json"
VERDICTS_ARTIFACT = "evaluation/verdict.json"  # model.calibration.VERDICT_FILE, as launch.evaluate logs it
_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?")


@dataclass(frozen=True)
class Calibration:
    """Reliability on held-out photos: mean confidence and accuracy of each non-empty bin."""

    confidence: np.ndarray
    accuracy: np.ndarray
    photos: int
    origin: str  # where it was read from, for the report

    def accuracy_at(self, confidence: float) -> float:
        """Held-out accuracy of counts given with ``confidence`` (interpolated between bins)."""
        return float(np.interp(confidence, self.confidence, self.accuracy))

    def flag_right(self, confidence: float, predicted: int, expected: int) -> float:
        """A lower bound on the chance that a flag is right.

        When the model's count differs from the expected one, the flag is right whenever the
        model's count is right (and also when both are wrong, which this bound leaves out).
        When they agree, the flag is right only when the model's count is wrong.
        """
        right = self.accuracy_at(confidence)
        return right if predicted != expected else 1.0 - right


def from_metrics(metrics: dict, origin: str) -> Calibration:
    """Read the reliability bins out of an evaluation's ``metrics.json``; ValueError if absent."""
    rel = metrics.get("reliability") if isinstance(metrics, dict) else None
    if not isinstance(rel, dict):
        raise ValueError(f"{origin} has no reliability bins (evaluated before they were recorded?)")
    conf = np.array([np.nan if v is None else v for v in rel.get("confidence", [])], dtype=float)
    acc = np.array([np.nan if v is None else v for v in rel.get("accuracy", [])], dtype=float)
    counts = np.array(rel.get("counts", []), dtype=float)
    keep = ~np.isnan(conf) & ~np.isnan(acc) & (counts > 0) if len(counts) == len(conf) else ~np.isnan(conf)
    if len(conf) != len(acc) or not keep.any():
        raise ValueError(f"{origin} has empty reliability bins")
    order = np.argsort(conf[keep])
    return Calibration(confidence=conf[keep][order], accuracy=acc[keep][order],
                       photos=int(metrics.get("n", counts.sum())), origin=origin)


def model_run_id(model_uri: str) -> tuple[str | None, str]:
    """The MLflow run behind ``model_uri`` (``models:/name@alias``, ``models:/name/N``,
    ``runs:/ID/...``) and a description naming the version; (None, reason) when there is none."""
    if model_uri.startswith("runs:/"):
        run_id = model_uri[len("runs:/"):].split("/", 1)[0]
        return (run_id or None), model_uri
    match = _MODEL_URI.fullmatch(model_uri)
    if not match:
        return None, f"{model_uri} is not a registered model or a run"
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(match["name"], match["alias"])
        else:
            version = client.get_model_version(match["name"], match["version"])
    except MlflowException as exc:
        return None, f"cannot resolve {model_uri}: {exc.message if hasattr(exc, 'message') else exc}"
    run_id = version.run_id or version.tags.get("lineage.training_run_id")
    return run_id, f"models:/{match['name']}/{version.version}"


def load(calibration: str | None, model_uri: str | None) -> tuple[Calibration | None, str]:
    """The calibration named by ``calibration`` (a metrics.json path or MLflow artifact URI),
    else the one logged with ``model_uri``'s run. Returns (None, why) when there is none."""
    try:
        if calibration:
            if "://" in calibration or calibration.startswith(("runs:/", "models:/")):
                return from_metrics(_download(artifact_uri=calibration), calibration), calibration
            return from_metrics(json.loads(Path(calibration).read_text()), calibration), calibration
        if not model_uri:
            return None, "the server did not say which model it serves; pass --calibration"
        metrics, origin = _from_model_run(model_uri, EVALUATION_ARTIFACT,
                                          "was the model evaluated into its training run?")
        return (from_metrics(metrics, origin) if metrics is not None else None), origin
    except (OSError, ValueError) as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; the report says why
        return None, f"cannot read the evaluation of {calibration or model_uri}: {type(exc).__name__}: {exc}"


def _from_model_run(model_uri: str, artifact: str, missing: str) -> tuple[object | None, str]:
    """``artifact`` (JSON) of the run that made ``model_uri``'s model and where it came from, or
    (None, why not); ``missing`` is the likely reason when the run lacks it."""
    run_id, described = model_run_id(model_uri)
    if run_id is None:
        return None, described
    try:
        return _download(run_id=run_id, artifact_path=artifact), f"{described} (run {run_id}, {artifact})"
    except Exception:  # noqa: BLE001 - MLflow says "failed to download"; say what is missing
        return None, f"{described}'s run {run_id} has no {artifact} ({missing})"


def load_verdicts(calibration: str | None, model_uri: str | None) -> tuple[dict | None, str]:
    """The verdict thresholds and figures evaluation chose for the model (``evaluation.verdicts``):
    the verdict file beside ``calibration`` when that is a local metrics.json, else the one logged
    with ``model_uri``'s run. Returns (None, why) when there is none; a file that fails its checks
    is refused the same way (the audit then uses the rules' defaults and says so)."""
    from bincounter.model.calibration import VERDICT_FILE, check_chosen

    try:
        if calibration and "://" not in calibration and not calibration.startswith(("runs:/", "models:/")):
            path = Path(calibration).parent / VERDICT_FILE
            if not path.is_file():
                return None, f"no {VERDICT_FILE} beside {calibration}"
            data, origin = json.loads(path.read_text()), str(path)
        else:
            if not model_uri:
                return None, "no model named"
            data, origin = _from_model_run(model_uri, VERDICTS_ARTIFACT, "evaluated before verdicts were chosen?")
            if data is None:
                return None, origin
        if not isinstance(data, dict) or not isinstance(data.get("figures"), list):
            raise ValueError(f"{origin} holds no verdict figures")
        data["chosen"] = check_chosen(data.get("chosen"), origin)
        return data, origin
    except (OSError, ValueError) as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; the report says why
        return None, f"cannot read the verdicts of {calibration or model_uri}: {type(exc).__name__}: {exc}"


def _download(**where) -> dict:
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="bincounter-calibration-") as tmp:
        path = mlflow.artifacts.download_artifacts(dst_path=tmp, **where)
        return json.loads(Path(path).read_text())
