"""Count metrics from labels and predicted probabilities (numpy only, no framework)."""

from __future__ import annotations

import numpy as np


def class_values(min_count: int, num_classes: int) -> np.ndarray:
    """The count each class stands for (an overflow class stands for max_count + 1)."""
    return np.arange(min_count, min_count + num_classes, dtype=np.float64)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def per_class_prf(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual}


def count_metrics(y_true: np.ndarray, probs: np.ndarray, values: np.ndarray) -> dict[str, float]:
    """Accuracy, RMSE, MAE and within-1 accuracy of the predicted count (argmax class)."""
    if len(y_true) == 0:
        return {"n": 0}
    y_pred = probs.argmax(axis=1)
    err = values[y_pred] - values[y_true]
    expected = probs @ values
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "mae": float(np.abs(err).mean()),
        "within_1": float((np.abs(err) <= 1).mean()),
        "rmse_expected": float(np.sqrt(((expected - values[y_true]) ** 2).mean())),
    }


def evaluate_predictions(y_true: np.ndarray, probs: np.ndarray, *, min_count: int,
                         class_names: list[str], compare_range: tuple[int, int] = (0, 5)) -> dict:
    """Every figure the evaluate stage reports.

    ``range_*`` figures keep only photos whose true count lies in ``compare_range`` (0-5 by
    default), so they compare with published Amazon Bin Image Dataset results.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    values = class_values(min_count, k)
    cm = confusion_matrix(y_true, probs.argmax(axis=1), k)
    prf = per_class_prf(cm)
    out: dict = dict(count_metrics(y_true, probs, values))
    out["macro_f1"] = float(prf["f1"][prf["support"] > 0].mean()) if (prf["support"] > 0).any() else 0.0
    lo, hi = compare_range
    mask = (values[y_true] >= lo) & (values[y_true] <= hi)
    out.update({f"range_{key}": v for key, v in count_metrics(y_true[mask], probs[mask], values).items()})
    out["per_class"] = {
        name: {m: float(prf[m][i]) for m in ("precision", "recall", "f1", "support")}
        for i, name in enumerate(class_names)
    }
    out["confusion_matrix"] = cm.tolist()
    out["class_names"] = list(class_names)
    return out


def reliability(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, np.ndarray | float]:
    """Confidence vs accuracy per confidence bin, and the expected calibration error."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    acc = np.array([correct[idx == b].mean() if (idx == b).any() else np.nan for b in range(bins)])
    mean_conf = np.array([conf[idx == b].mean() if (idx == b).any() else np.nan for b in range(bins)])
    counts = np.array([(idx == b).sum() for b in range(bins)])
    ece = float(np.nansum(np.abs(acc - mean_conf) * counts) / max(len(y_true), 1))
    return {"edges": edges, "accuracy": acc, "confidence": mean_conf, "counts": counts, "ece": ece}
