"""Calibration stored with a model: a temperature that makes its probabilities honest, and the
threshold of its count sets.

A network trained with cross-entropy is usually overconfident: when it says 0.9 it is right less
often than 90% of the time. Dividing its logits by a temperature T > 1 (fitted to minimise the
negative log-likelihood on photos it did not train on) softens every answer alike and keeps the
argmax, so accuracy is unchanged and the probabilities become trustworthy. The model spec carries
T, and the one module that turns logits into probabilities (``TTAProbabilities``) applies it, so
evaluation, the pyfunc, the ONNX graph and the server all answer calibrated probabilities.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

LOWEST, HIGHEST = 0.05, 20.0


def probabilities(view_logits: np.ndarray, temperature: float) -> np.ndarray:
    """Class probabilities averaged over test-time views: ``view_logits`` is [photos, views, classes]."""
    z = view_logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return p.mean(axis=1)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def fit_temperature(view_logits: np.ndarray, labels: np.ndarray, *, iterations: int = 60) -> float:
    """The temperature minimising the NLL of ``labels`` (golden-section search on log T, between
    ``LOWEST`` and ``HIGHEST``; the NLL of a scaled softmax is unimodal in T)."""
    if len(labels) == 0:
        raise ValueError("no photos to fit a temperature on")
    view_logits = np.asarray(view_logits, dtype=np.float64)
    if view_logits.ndim == 2:
        view_logits = view_logits[:, None, :]
    labels = np.asarray(labels, dtype=np.int64)

    def loss(log_t: float) -> float:
        return nll(probabilities(view_logits, math.exp(log_t)), labels)

    lo, hi = math.log(LOWEST), math.log(HIGHEST)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(math.exp((lo + hi) / 2))


def conformal_threshold(probs: np.ndarray, labels: np.ndarray, coverage: float) -> float:
    """Split conformal: the probability a class needs to be in a count set so that sets hold the
    true count with probability at least ``coverage`` on photos like these (held out from fitting
    anything else). The score of a photo is 1 - p(true class); the threshold is 1 minus the
    score's ceil((n + 1) coverage)-th smallest value."""
    n = len(labels)
    if n == 0:
        raise ValueError("no photos to fit the count sets' threshold on")
    scores = np.sort(1.0 - np.asarray(probs)[np.arange(n), np.asarray(labels)])
    rank = math.ceil((n + 1) * coverage)
    if rank > n:  # too few photos for this coverage: every class is in every set
        return 0.0
    return float(1.0 - scores[rank - 1])


# Written by evaluation (``evaluation.verdicts``) and served with the model (registration copies it
# beside the weights): the verdict thresholds chosen on the test split, per rule, and the figures
# they gave. A model without it is judged with the rule's default thresholds.
VERDICT_FILE = "verdict.json"
_MAX_VERDICT_BYTES = 1 << 20


def chosen_thresholds(folder: str | Path) -> dict[str, dict[str, float]]:
    """{rule: {"flag_threshold", "match_threshold"}} from ``folder``'s verdict file ({} when there
    is none). A file that is too large, not JSON or holds thresholds outside 0..1 (or a flag
    threshold not below the match threshold) raises ValueError: a model must not serve verdicts
    from figures nobody can vouch for."""
    path = Path(folder) / VERDICT_FILE
    if not path.is_file():
        return {}
    if path.stat().st_size > _MAX_VERDICT_BYTES:
        raise ValueError(f"{path} is larger than {_MAX_VERDICT_BYTES} bytes: not a verdict file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    return check_chosen(data.get("chosen") if isinstance(data, dict) else None, str(path))


def check_chosen(chosen: object, where: str) -> dict[str, dict[str, float]]:
    """``chosen`` as {rule: {"flag_threshold", "match_threshold"}}, checked (ValueError names ``where``)."""
    if not isinstance(chosen, dict):
        raise ValueError(f"{where} has no 'chosen' thresholds")
    out: dict[str, dict[str, float]] = {}
    for rule, pair in chosen.items():
        if rule not in ("posterior", "thresholds") or not isinstance(pair, dict):
            raise ValueError(f"{where}: unknown verdict rule {str(rule)[:40]!r}")
        values = [pair.get(k) for k in ("flag_threshold", "match_threshold")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in values) \
                or not values[0] < values[1]:
            raise ValueError(f"{where}: the {rule} thresholds must be numbers in 0..1, flag below match")
        out[rule] = {"flag_threshold": float(values[0]), "match_threshold": float(values[1])}
    return out
