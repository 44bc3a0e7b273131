"""The promotion gate: a challenger replaces the champion only when it is better on the same photos.

Both models are scored on the challenger's test split through the served path (the champion is
evaluated again there, as ``bincounter evaluate`` scores any model), so the comparison is paired:
the same photos, the same label definitions. Models that answer over different classes or count
them differently are refused, not compared. The challenger must beat the champion on the gate's
metric by more than ``min_improvement``, with McNemar's exact test on the photos exactly one of
them counted right at most ``max_p_value``, without any class's recall dropping by more than
``max_class_drop`` nor the RMSE rising by more than ``max_rmse_increase``. The evidence (both
models' figures, the p-value, the photos' digest) becomes the version's tags and model card.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bincounter.config import EvaluateConfig, RegisterConfig
from bincounter.evaluation.compare import mcnemar_p, read_predictions
from bincounter.evaluation.metrics import class_values, confusion_matrix, per_class_prf
from bincounter.fileio import atomic_write
from bincounter.registry.register import Verdict


@dataclass(frozen=True)
class PairedScores:
    """The challenger and the champion on the same photos."""

    photos: int
    left_out: int  # refused by either model's server
    photos_sha256: str  # of the photos' ids and true counts, in order
    challenger: dict[str, float]
    champion: dict[str, float]
    only_challenger_right: int
    only_champion_right: int
    p_value: float
    recall: dict[str, tuple[float, float, int]]  # class name -> (challenger, champion, photos)


def label_definition(spec: dict) -> dict:
    """What a model's answers mean: the classes it answers over and the count of the first."""
    return {"class_names": list(spec.get("class_names") or []), "min_count": int(spec.get("min_count", 0))}


def different_labels(challenger_spec: dict, champion_spec: dict) -> str | None:
    """Why the two models' answers cannot be compared, or None when they mean the same."""
    a, b = label_definition(challenger_spec), label_definition(champion_spec)
    if a == b:
        return None
    return (f"the challenger answers over classes {a['class_names']} (first count {a['min_count']}) and the "
            f"champion over {b['class_names']} (first count {b['min_count']}): different label definitions are "
            "not compared")


def figures(truth: np.ndarray, predicted: np.ndarray, values: np.ndarray) -> dict[str, float]:
    """The gate's metrics of one model's answers (class indices) on the photos."""
    err = values[predicted] - values[truth]
    prf = per_class_prf(confusion_matrix(truth, predicted, len(values)))
    present = prf["support"] > 0
    return {"accuracy": float((predicted == truth).mean()), "rmse": float(np.sqrt((err**2).mean())),
            "mae": float(np.abs(err).mean()), "within_1": float((np.abs(err) <= 1).mean()),
            "macro_f1": float(prf["f1"][present].mean()) if present.any() else 0.0}


def score_pair(challenger: str | Path, champion: str | Path, class_names: list[str], min_count: int) -> PairedScores:
    """Both evaluations' ``predictions.csv`` (or their folders), which must cover the same photos with
    the same true counts; photos either server refused are left out and counted."""
    a, b = read_predictions(challenger), read_predictions(champion)
    if a.keys() != b.keys() or any(a[i][0] != b[i][0] for i in a):
        raise ValueError(f"{challenger} and {champion} did not score the same photos with the same counts")
    ids = sorted(i for i in a if a[i][1] is not None and b[i][1] is not None)
    if not ids:
        raise ValueError("no photo was answered by both the challenger and the champion")
    truth = np.array([a[i][0] for i in ids])
    pa, pb = np.array([a[i][1] for i in ids]), np.array([b[i][1] for i in ids])
    values = class_values(min_count, len(class_names))
    right_a, right_b = pa == truth, pb == truth
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    recall = {}
    for k, name in enumerate(class_names):
        mask = truth == k
        if mask.any():
            recall[name] = (float(right_a[mask].mean()), float(right_b[mask].mean()), int(mask.sum()))
    digest = hashlib.sha256("".join(f"{i}\t{a[i][0]}\n" for i in ids).encode()).hexdigest()
    return PairedScores(photos=len(ids), left_out=len(a) - len(ids), photos_sha256=digest,
                        challenger=figures(truth, pa, values), champion=figures(truth, pb, values),
                        only_challenger_right=only_a, only_champion_right=only_b, p_value=mcnemar_p(only_a, only_b),
                        recall=recall)


def decide(cfg: RegisterConfig, paired: PairedScores) -> tuple[bool, str]:
    """Whether the challenger replaces the champion, and why: every condition it fails is named."""
    metric = cfg.metric
    new, old = paired.challenger[metric], paired.champion[metric]
    gain = (new - old) if cfg.higher_is_better else (old - new)
    failed = []
    if not gain > cfg.min_improvement:
        failed.append(f"{metric} {new:.4f} against the champion's {old:.4f} on the same {paired.photos} photos is a "
                      f"gain of {gain:+.4f}, not more than {cfg.min_improvement}")
    if paired.p_value > cfg.max_p_value:
        failed.append(f"McNemar p = {paired.p_value:.3g} ({paired.only_challenger_right} photos only the challenger "
                      f"counted right, {paired.only_champion_right} only the champion) is above {cfg.max_p_value}")
    rmse_rise = paired.challenger["rmse"] - paired.champion["rmse"]
    if rmse_rise > cfg.max_rmse_increase:
        failed.append(f"RMSE rises by {rmse_rise:.4f} (more than {cfg.max_rmse_increase})")
    for name, (mine, theirs, n) in paired.recall.items():
        if n >= cfg.min_class_photos and theirs - mine > cfg.max_class_drop:
            failed.append(f"class {name}'s recall drops from {theirs:.3f} to {mine:.3f} on {n} photos "
                          f"(more than {cfg.max_class_drop})")
    if failed:
        return False, "kept: " + "; ".join(failed)
    return True, (f"promoted: {metric} {new:.4f} against the champion's {old:.4f} on the same {paired.photos} photos "
                  f"(gain {gain:+.4f}), McNemar p = {paired.p_value:.3g}, no class or RMSE regression past the margins")


def evidence(paired: PairedScores) -> dict[str, str]:
    """The figures behind a decision, as version tags."""
    tags = {"gate.photos": str(paired.photos), "gate.left_out": str(paired.left_out),
            "gate.photos_sha256": paired.photos_sha256, "gate.p_value": f"{paired.p_value:.6g}",
            "gate.only_challenger_right": str(paired.only_challenger_right),
            "gate.only_champion_right": str(paired.only_champion_right),
            "gate.class_recall": json.dumps({k: [round(a, 4), round(b, 4), n] for k, (a, b, n) in paired.recall.items()})}
    for side in ("challenger", "champion"):
        tags.update({f"gate.{side}.{k}": f"{v:.6g}" for k, v in getattr(paired, side).items()})
    return tags


ScoreChampion = Callable[[str], tuple[dict, Path]]  # champion version -> (its spec, its predictions.csv)


def paired_judge(cfg: RegisterConfig, challenger_spec: dict, challenger_eval: str | Path,
                 score_champion: ScoreChampion) -> Callable[[str | None], Verdict]:
    """The registry's judge for this challenger: each champion version it is asked about is scored
    on the challenger's photos once (``score_champion``), then compared."""
    scored: dict[str, tuple[dict, Path]] = {}

    def judge(champion: str | None) -> Verdict:
        if champion is None:
            return Verdict(True, "promoted: no champion yet, the first model is promoted",
                           {"gate.champion_version": "none"})
        if champion not in scored:
            scored[champion] = score_champion(champion)
        champion_spec, champion_predictions = scored[champion]
        refused = different_labels(challenger_spec, champion_spec)
        if refused:
            return Verdict(False, f"refused: {refused}", {"gate.champion_version": champion})
        definition = label_definition(challenger_spec)
        paired = score_pair(challenger_eval, champion_predictions, definition["class_names"], definition["min_count"])
        promoted, reason = decide(cfg, paired)
        return Verdict(promoted, reason, {"gate.champion_version": champion, **evidence(paired)})

    return judge


def champion_scorer(cfg: RegisterConfig, data_dir: str | Path, work: str | Path,
                    evaluate_cfg: EvaluateConfig | None = None) -> ScoreChampion:
    """Score a registered version on ``data_dir``'s test split as the challenger was: download it,
    then ``evaluate`` it (served path) into ``work/champion-v<version>``."""

    def score(version: str) -> tuple[dict, Path]:
        import mlflow

        from bincounter import tracking
        from bincounter.evaluation.evaluate import evaluate
        from bincounter.serving.loading import native_folder

        tracking.configure(cfg.tracking_uri, cfg.experiment)
        with tempfile.TemporaryDirectory(prefix="bincounter-champion-") as tmp:
            downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{cfg.model_name}/{version}", dst_path=tmp))
            folder = native_folder(downloaded)
            if folder is None:
                raise ValueError(f"champion v{version} of {cfg.model_name!r} is not a bincounter model (no "
                                 "model_spec.json): it cannot be scored on the challenger's photos")
            spec = json.loads((folder / "model_spec.json").read_text())
            out = Path(work) / f"champion-v{version}"
            evaluate(evaluate_cfg or EvaluateConfig(latency_samples=0), folder, data_dir, out)
        return spec, out / "predictions.csv"

    return score


SMOKE_MANIFEST = "expected.json"


def write_smoke_set(data_dir: str | Path, predictions: str | Path, class_names: list[str], model_version: str,
                    out: str | Path, photos: int) -> Path:
    """A few test photos and how the version that will serve answered them in its evaluation, for
    the deploy step to ask the new pods again (``bincounter.deploy.smoke``): the photos are the
    bytes the evaluation scored (the originals the dataset keeps, else its test shards)."""
    from bincounter.data.dataset import read_samples, shard_urls
    from bincounter.data.preprocess import ORIGINALS
    from bincounter.evaluation.evaluate import _read_original, original_paths

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    answered = {i: p for i, (_, p) in read_predictions(predictions).items() if p is not None}
    ids = sorted(answered)[:photos]
    originals = Path(data_dir) / ORIGINALS
    if originals.is_dir():
        data = [_read_original(path, sha, i) for i, (path, sha) in zip(ids, original_paths(data_dir, ids, [originals]))]
    else:
        by_id = {i: jpg for i, jpg, _ in read_samples(shard_urls(data_dir, "test"))}
        data = [by_id[i] for i in ids]
    entries = []
    for k, (id_, image) in enumerate(zip(ids, data)):
        (out / f"{k:03d}.jpg").write_bytes(image)
        entries.append({"file": f"{k:03d}.jpg", "id": id_, "label": class_names[answered[id_]]})
    atomic_write(out / SMOKE_MANIFEST, json.dumps({"model_version": model_version, "photos": entries}).encode())
    return out
