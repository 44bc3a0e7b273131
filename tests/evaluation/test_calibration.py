"""Held-out reliability read back from an evaluation, and what it says about a flag."""

import numpy as np
import pytest

from bincounter.evaluation import calibration
from bincounter.evaluation.metrics import reliability


def _metrics(y, probs) -> dict:
    rel = reliability(np.array(y), np.array(probs))
    return {"n": len(y), "reliability": {k: [None if np.isnan(v) else float(v) for v in np.asarray(rel[k], float)]
                                         for k in ("edges", "accuracy", "confidence", "counts")}}


def test_reliability_bins_round_trip_and_bound_a_flags_precision():
    # Confident counts (0.95) right 3 times in 4; hesitant ones (0.55) right 1 time in 2.
    probs = [[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 2
    cal = calibration.from_metrics(_metrics([0, 0, 0, 1, 0, 1], probs), "metrics.json")
    assert cal.photos == 6
    assert cal.accuracy_at(0.95) == pytest.approx(0.75) and cal.accuracy_at(0.55) == pytest.approx(0.5)
    assert cal.accuracy_at(0.75) == pytest.approx(0.625)  # between bins: interpolated
    # Model says 0 (conf 0.95), inventory says 1: the flag is right whenever the model is.
    assert cal.flag_right(0.95, predicted=0, expected=1) == pytest.approx(0.75)
    # Model's own count is the expected one: a flag is right only if the model is wrong.
    assert cal.flag_right(0.95, predicted=1, expected=1) == pytest.approx(0.25)


def test_an_evaluation_without_reliability_bins_is_named():
    with pytest.raises(ValueError, match="old.json has no reliability bins"):
        calibration.from_metrics({"n": 3, "ece": 0.1}, "old.json")
    cal, why = calibration.load("/nonexistent/metrics.json", None)
    assert cal is None and "/nonexistent/metrics.json" in why


def test_which_run_a_model_uri_names():
    assert calibration.model_run_id("runs:/abc123/model") == ("abc123", "runs:/abc123/model")
    run_id, why = calibration.model_run_id("/some/folder/model")
    assert run_id is None and "not a registered model" in why
    run_id, why = calibration.model_run_id("models:/nobody@champion")
    assert run_id is None and "cannot resolve models:/nobody@champion" in why
