"""Thresholds from targets: chosen on one set of photos against a simulated inventory, they meet
their targets on fresh photos, for the posterior rule and the rule of old alike."""

from __future__ import annotations

import numpy as np
import pytest

from bincounter.config import VerdictConfig
from bincounter.evaluation.verdicts import choose, figures, figures_at, pairs, report

N_CLASSES = 6


def calibrated_photos(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(true counts, probabilities) of a model calibrated by construction: each photo's count is
    drawn from the probabilities the model answers, which are about as sharp as the real model's."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.0, size=(n, N_CLASSES))
    z[np.arange(n), rng.integers(0, N_CLASSES, n)] += rng.uniform(0.5, 4.0, n)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    truth = np.array([rng.choice(N_CLASSES, p=p) for p in probs])
    return truth, probs


@pytest.mark.parametrize("rule", ["posterior", "thresholds"])
@pytest.mark.parametrize("error_rate", [0.05, 0.2])
def test_chosen_thresholds_meet_their_targets_on_fresh_photos(rule, error_rate):
    """Chosen on 3,000 photos, judged on 10,000 others (so the fresh figures are close to the
    thresholds' true ones), for four seeds: flags are right at the target less a little, or the
    thresholds flag nothing; wrong records are passed at most at the ceiling, a little more."""
    cfg = VerdictConfig(rule=rule, error_rate=error_rate)
    for seed in range(4):
        truth, probs = calibrated_photos(seed, 3000)
        picked = choose(pairs(truth, probs, 0, False, cfg), 0.95, 0.05)
        fresh_truth, fresh_probs = calibrated_photos(seed + 1000, 10_000)
        found = figures(pairs(fresh_truth, fresh_probs, 0, False, cfg), picked["flag_threshold"],
                        picked["match_threshold"])
        if not picked["flags_nothing"] and found.flag_precision is not None:
            assert found.flag_precision >= 0.92, (seed, picked, found)
        assert found.wrong_passed <= 0.06, (seed, picked, found)
        assert found.settled > 0.2  # it settles bins at all


@pytest.mark.parametrize("seed", [0, 1])
def test_the_posterior_rule_flags_rightly_where_the_rule_of_old_does_not(seed):
    """At the rule of old's fixed thresholds (0.05 / 0.5) on a rare error rate, many flags are
    false; the posterior rule's default thresholds keep the flags right."""
    truth, probs = calibrated_photos(seed, 3000)
    old = VerdictConfig(rule="thresholds", error_rate=0.05)
    new = VerdictConfig(rule="posterior", error_rate=0.05)
    before = figures(pairs(truth, probs, 0, False, old), *old.thresholds())
    after = figures(pairs(truth, probs, 0, False, new), *new.thresholds())
    assert after.flag_precision > before.flag_precision
    assert after.flag_precision >= 0.9


def test_the_report_covers_the_rates_and_targets_users_choose_by():
    truth, probs = calibrated_photos(3, 1500)
    raw = probs ** 2 / (probs ** 2).sum(1, keepdims=True)  # sharper: an overconfident model before calibration
    found = report(truth, probs, 0, False, VerdictConfig(error_rate=0.05), 0.95, 0.05, before=raw)
    assert set(found["chosen"]) == {"posterior", "thresholds"}
    rates = {r["error_rate"] for r in found["figures"]}
    assert {0.01, 0.05, 0.2} <= rates
    assert {r["rule"] for r in found["figures"]} == {"posterior", "thresholds", "thresholds (uncalibrated)"}
    assert {(c["error_rate"], c["target_flag_precision"]) for c in found["choices"]} >= {(0.05, 0.95), (0.2, 0.99)}
    assert len(found["table"]["rows"]) == 9  # 3 rates x (2 rules + the baseline)
    at = figures_at(found, "posterior", 0.05)
    row = next(r for r in found["figures"] if r["rule"] == "posterior" and r["error_rate"] == 0.05)
    assert at["flag_precision"] == pytest.approx(row["flag_precision"]) and not at["interpolated"]
    assert figures_at(found, "posterior", 0.07)["interpolated"]
