"""Register: log the pyfunc, add a model version, and gate its promotion to ``champion``.

Every new version gets the alias ``challenger``. ``champion`` moves to it only when the judge
says so: the caller's function of the champion's version that compares the two models
(``bincounter.evaluation.gate`` scores both on the same photos; the first version is
promoted). The decision, its reason and its evidence are recorded as version tags either way,
under a registry-wide lock, and only if the champion judged is still the champion.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import bincounter
from bincounter import tracking
from bincounter.config import RegisterConfig
from bincounter.model.onnx_export import serving_files

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


def log_pyfunc(model_dir: str | Path, example_images: list[bytes], verdicts: dict | None = None,
               extra: Sequence[Path] = ()):
    """Log the serving pyfunc into the active run; returns mlflow's ModelInfo. ``verdicts``: the
    thresholds evaluation chose (``extra`` holds its file), also kept in the model's metadata."""
    import json

    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    from bincounter.registry.pyfunc import BinCounterModel

    spec = json.loads((Path(model_dir) / "model_spec.json").read_text())
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("long", "count"), ColSpec("string", "label"), ColSpec("double", "confidence"),
                        ColSpec("double", "expected_count"), ColSpec(Array("double"), "probabilities")]),
    )
    # Only the weights and spec travel as artifacts; checkpoints and plots stay with the run.
    with serving_files(model_dir, extra) as serving_dir:
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=BinCounterModel(),
            artifacts={"model_dir": str(serving_dir)},
            code_paths=[str(Path(bincounter.__file__).parent)],
            signature=signature,
            # Two rows: the signature is column-based, so no batch size is pinned.
            input_example=pd.DataFrame({"image": example_images[:2]}) if example_images else None,
            pip_requirements=_requirements(),
            metadata={**{k: spec.get(k) for k in ("class_names", "image_size", "mean", "std", "backbone", "tta",
                                                  "rot90", "min_count", "temperature", "count_set_threshold",
                                                  "count_set_coverage")},
                      "verdict": (verdicts or {}).get("chosen")},
        )


def _requirements() -> list[str]:
    from importlib.metadata import version

    pins = ["torch", "torchvision", "mlflow", "pillow", "numpy", "pandas", "pydantic",
            "efficientnet-lite-pytorch", "webdataset", "tqdm"]
    return [f"{p}=={version(p)}" for p in pins]


def verdict_section(spec: dict, verdicts: dict | None) -> str:
    """The model card's calibration and verdict section (``evaluation.verdicts``' figures)."""
    from bincounter.reporting import markdown_table

    fitted = spec.get("count_set_threshold") is not None or spec.get("temperature", 1.0) != 1.0
    lines = [f"Probabilities are calibrated: logits divided by a temperature of {spec.get('temperature', 1.0):.3f} "
             "fitted on validation photos." if fitted else "Probabilities are the network's own, not calibrated "
             "(trained without validation photos or with calibrate off)."]
    if spec.get("count_set_threshold") is not None:
        lines.append(f"Each answer's `count_set` holds the counts at probability >= {spec['count_set_threshold']:.3f}: "
                     f"it held the true count {100 * spec['count_set_coverage']:.0f}% of the time on held-out photos.")
    if not verdicts:
        return "\n".join(lines + ["No verdict thresholds were chosen for this model: the rules' defaults apply."])
    chosen = verdicts["chosen"]["posterior"]
    lines += ["", f"Verdict thresholds chosen on {verdicts['photos']} test photos against an inventory with "
              f"{100 * verdicts['error_rate']:g}% wrong records, for a flag precision of at least "
              f"{100 * verdicts['target_flag_precision']:g}% and at most {100 * verdicts['max_wrong_passed']:g}% of "
              f"the wrong records passed: mismatch at P(record right) <= {chosen['flag_threshold']:.4g}, match at "
              f">= {chosen['match_threshold']:.4g}. What they do at other error rates:", ""]
    return "\n".join(lines + markdown_table(verdicts["table"]["header"], verdicts["table"]["rows"]))


def model_card(name: str, version: str, metrics: dict, lineage: dict, spec: dict, verdict: Verdict,
               verdicts: dict | None = None) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()) if isinstance(v, float))
    lin = "\n".join(f"- {k}: `{v}`" for k, v in sorted(lineage.items()))
    decision = verdict.reason + "".join(f"\n- {k}: `{v}`" for k, v in sorted(verdict.evidence.items()))
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

## Calibration and verdicts
{verdict_section(spec, verdicts)}

## Data and lineage
{lin}

## Promotion
{decision}

## Limits
- Trained for counts {spec.get('class_names', ['?'])[0]} to {spec.get('class_names', ['?'])[-1]}; a bin holding more
  is predicted as the largest class (or the overflow class when there is one).
- Accuracy drops on crowded bins, occluded items and bins whose strap tapes hide items; the
  verdict sends the bins it cannot settle to a person ("unsure").
- Evaluated on photos from the same distribution as training; re-evaluate before use on other sites.
"""


class PromotionError(RuntimeError):
    """The gate cannot decide (a missing metric, a champion that keeps changing): nothing is promoted."""


@dataclass(frozen=True)
class Verdict:
    """A judge's decision on one challenger against one champion, with the figures behind it."""

    promote: bool
    reason: str
    evidence: dict[str, str] = field(default_factory=dict)


# The champion's version (None: there is none) -> the verdict on the challenger against it.
Judge = Callable[[str | None], Verdict]


def champion_version(client, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


LOCK_SUFFIX = ".promotion-lock"
LOCK_STALE_S = 600.0  # a lock older than this was left by a killed process


@contextlib.contextmanager
def registry_lock(client, name: str, timeout: float = 300.0) -> Iterator[None]:
    """Hold the registry-wide promotion lock of model ``name``, shared by every pod.

    MLflow has no compare-and-set on aliases, but creating a registered model is an insert on
    a unique key, which exactly one of any number of racing callers wins: the lock is the
    registered model ``<name>.promotion-lock`` (tagged with its holder), deleted on release.
    A lock older than ``LOCK_STALE_S`` is broken, so a killed holder blocks nobody for long.
    """
    from mlflow.exceptions import MlflowException

    lock, holder = name + LOCK_SUFFIX, f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": holder}, description="bincounter promotion lock")
            break
        except MlflowException as exc:
            # Taken; or taken and released while MLflow looked up the holder to report it.
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        _break_if_stale(client, lock)
        if time.monotonic() > deadline:
            raise TimeoutError(f"promotion lock {lock!r} still held after {timeout:g} s")
        time.sleep(random.uniform(0.05, 0.3))
    try:
        yield
    finally:
        try:
            client.delete_registered_model(lock)
        except MlflowException:
            pass  # broken as stale meanwhile: nothing of ours to release


def _break_if_stale(client, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        held = client.get_registered_model(lock)
    except MlflowException:
        return  # released meanwhile
    if time.time() - held.creation_timestamp / 1000 > LOCK_STALE_S:
        try:
            client.delete_registered_model(lock)
        except MlflowException:
            pass


def promote(client, cfg: RegisterConfig, version: str, judge: Judge, *, attempts: int = 5) -> Verdict:
    """Gate ``version`` against the champion and record the decision on the version.

    The judge runs outside the registry lock (scoring the champion can take long); under the
    lock the champion is read again, and the alias moves only if it is still the one judged, so
    two registrations at once in two pods end with every decision true when made. A champion
    that changed meanwhile is judged again, up to ``attempts`` times."""
    for _ in range(attempts):
        judged = champion_version(client, cfg.model_name)
        verdict = judge(judged)
        with registry_lock(client, cfg.model_name):
            client.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
            if champion_version(client, cfg.model_name) != judged:
                continue  # promoted elsewhere meanwhile: the evidence is about another champion
            if verdict.promote:
                client.set_registered_model_alias(cfg.model_name, CHAMPION, version)
            tags = {"promotion.decision": "promoted" if verdict.promote else "kept", "promotion.reason": verdict.reason,
                    "promotion.metric": cfg.metric, "promotion.champion_before": judged or "none", **verdict.evidence}
            for key, value in tags.items():
                client.set_model_version_tag(cfg.model_name, version, key, value[:5000])
            return verdict
    raise PromotionError(f"the champion of {cfg.model_name!r} changed during each of {attempts} gates of "
                         f"v{version}; nothing promoted")


def files_sha256(model_dir: str | Path, extra: Sequence[Path] = ()) -> str:
    """Digest of what is served (the weights, the ONNX graph, the spec, the verdict thresholds):
    what a pinned deployment names besides the version."""
    import hashlib

    digest = hashlib.sha256()
    with serving_files(model_dir, extra) as folder:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def register(cfg: RegisterConfig, model_dir: str | Path, metrics: dict[str, float], *, judge: Judge,
             run_id: str | None = None, lineage: dict[str, str] | None = None,
             example_images: list[bytes] | None = None, verdict_file: Path | None = None,
             int8_file: Path | None = None) -> RegisterResult:
    """Log, register, tag, and gate with ``judge``. ``run_id`` is the training run to attach the model to;
    ``verdict_file``: the evaluation's verdict thresholds and figures, served with the model;
    ``int8_file``: the INT8 graph evaluation scored and kept (``model.int8.onnx``), served by default."""
    import json

    import mlflow
    from mlflow import MlflowClient

    if cfg.metric not in metrics or metrics[cfg.metric] is None or math.isnan(float(metrics[cfg.metric])):
        raise PromotionError(f"the evaluation has no '{cfg.metric}' to gate on (it has {sorted(metrics)}); "
                             "nothing registered")
    tracking.configure(cfg.tracking_uri, cfg.experiment)
    spec = json.loads((Path(model_dir) / "model_spec.json").read_text())
    lineage = {"git_commit": git_commit(), **(lineage or {})}
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register") as run:
        mlflow.log_params({k: str(v) for k, v in cfg.flat("register.").items()})
        extra = [f for f in (verdict_file, int8_file) if f is not None]
        verdicts = json.loads(verdict_file.read_text()) if verdict_file is not None else None
        info = log_pyfunc(model_dir, example_images or [], verdicts, extra)
        tracking.log_metrics({f"test_{k}": v for k, v in metrics.items()})
        mlflow.set_tags({f"lineage.{k}": v for k, v in lineage.items()})
    client = MlflowClient()
    version = mlflow.register_model(info.model_uri, cfg.model_name,
                                    tags={**{f"metric.{k}": str(v) for k, v in metrics.items()},
                                          **{f"lineage.{k}": v for k, v in lineage.items()},
                                          "lineage.training_run_id": run.info.run_id,
                                          "model.sha256": files_sha256(model_dir, extra)}).version
    verdict = promote(client, cfg, str(version), judge)
    card = model_card(cfg.model_name, version, metrics, lineage, spec, verdict, verdicts)
    client.update_model_version(cfg.model_name, version, description=card)
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_text(card, f"model_card_v{version}.md")
    return RegisterResult(name=cfg.model_name, version=str(version), model_uri=f"models:/{cfg.model_name}/{version}",
                          promoted=verdict.promote, reason=verdict.reason, run_id=run.info.run_id)
