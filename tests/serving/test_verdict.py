"""The verdict rule shared by the audit, the page and the server."""

import math

import pytest

from bincounter.config import AuditConfig, VerdictConfig
from bincounter.serving.verdict import first_count, probability_of, verdict

CFG = VerdictConfig(flag_threshold=0.05, match_threshold=0.5)


@pytest.mark.parametrize("p, expected", [(0.0, "mismatch"), (0.05, "mismatch"), (0.0501, "unsure"),
                                         (0.4999, "unsure"), (0.5, "match"), (1.0, "match"),
                                         (None, "unsure"), (math.nan, "unsure")])
def test_verdict_bands_include_their_thresholds(p, expected):
    assert verdict(p, CFG) == expected


def test_thresholds_must_leave_a_band_for_a_person():
    with pytest.raises(ValueError, match="flag_threshold must be below match_threshold"):
        VerdictConfig(flag_threshold=0.5, match_threshold=0.5)
    with pytest.raises(ValueError):
        AuditConfig.model_validate({"verdict": {"flag_threshold": 0.1, "match_threshold": 0.05}})


def test_probability_of_a_count_follows_the_first_class():
    probs = [0.1, 0.6, 0.3]  # counts 1, 2, 3
    assert first_count(2, probs) == 1
    assert probability_of(3, probs, first=1) == pytest.approx(0.3)
    assert probability_of(0, probs, first=1) is None  # below what the model knows
    assert probability_of(7, probs, first=1) is None  # above, and the last class is not open-ended
    assert probability_of(7, probs, first=1, open_ended=True) == pytest.approx(0.3)  # "3 or more"


def test_a_count_the_model_cannot_judge_goes_to_a_person():
    assert verdict(probability_of(12, [0.0] * 5 + [1.0]), CFG) == "unsure"
