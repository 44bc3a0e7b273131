"""Calibration stored with a model: the temperature makes overconfident probabilities honest,
and count sets hold the true count as often as they promise, on photos nothing was fitted on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bincounter.model.calibration import (VERDICT_FILE, check_chosen, chosen_thresholds, conformal_threshold,
                                          fit_temperature, nll, probabilities)


def _overconfident(seed: int, n: int, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``scale`` times too sharp: labels are drawn from softmax(z), the model says softmax(scale * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.0, size=(n, 6))
    z[np.arange(n), rng.integers(0, 6, n)] += 1.5
    true_p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(6, p=p) for p in true_p])
    return (scale * z)[:, None, :], labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_fitted_temperature_lowers_the_nll_on_fresh_photos(seed):
    logits, labels = _overconfident(seed, 1500)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(3.0, rel=0.15)  # it finds how much too sharp the logits are
    fresh, fresh_labels = _overconfident(seed + 100, 1500)
    before, after = nll(probabilities(fresh, 1.0), fresh_labels), nll(probabilities(fresh, temperature), fresh_labels)
    assert after < before - 0.1
    # The argmax, and so the accuracy, is the same at any temperature.
    assert (probabilities(fresh, temperature).argmax(1) == probabilities(fresh, 1.0).argmax(1)).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_count_sets_hold_the_true_count_as_often_as_promised(seed):
    logits, labels = _overconfident(seed, 1000, scale=1.0)
    probs = probabilities(logits, 1.0)
    threshold = conformal_threshold(probs, labels, 0.9)
    fresh, fresh_labels = _overconfident(seed + 50, 4000, scale=1.0)
    p = probabilities(fresh, 1.0)
    covered = (p[np.arange(len(fresh_labels)), fresh_labels] >= threshold).mean()
    assert 0.87 <= covered <= 0.95
    assert conformal_threshold(probs[:5], labels[:5], 0.9) == 0.0  # too few photos: every count is in


def test_a_verdict_file_is_read_and_checked(tmp_path):
    assert chosen_thresholds(tmp_path) == {}
    good = {"posterior": {"flag_threshold": 0.02, "match_threshold": 0.97}}
    (tmp_path / VERDICT_FILE).write_text(json.dumps({"chosen": good, "figures": []}))
    assert chosen_thresholds(tmp_path) == good
    for bad in ({"posterior": {"flag_threshold": 0.9, "match_threshold": 0.1}},
                {"posterior": {"flag_threshold": "0.1", "match_threshold": 0.9}},
                {"posterior": {"flag_threshold": True, "match_threshold": 0.9}},
                {"other": {"flag_threshold": 0.1, "match_threshold": 0.9}}, [], None):
        with pytest.raises(ValueError):
            check_chosen(bad, "test")
    (tmp_path / VERDICT_FILE).write_text("[" * 100_000)
    with pytest.raises(ValueError, match="not JSON"):
        chosen_thresholds(tmp_path)
    (tmp_path / VERDICT_FILE).write_bytes(b" " * (2 << 20))
    with pytest.raises(ValueError, match="larger than"):
        chosen_thresholds(tmp_path)
