"""The verdict rule shared by the audit, the page and the server."""

import math

import pytest

from bincounter.config import AuditConfig, VerdictConfig
from bincounter.serving.verdict import (count_set, error_spread, first_count, judge, probability_of, record_prior,
                                       record_right, verdict)

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


# -- the posterior rule ---------------------------------------------------------------------


def test_the_error_model_spreads_every_wrong_record_and_is_symmetric():
    cfg = VerdictConfig(error_rate=0.1, off_by_one_share=0.7, off_by_more_share=0.1)
    spread = dict(error_spread(3, 8, 0, False, cfg.error_rate, cfg.off_by_one_share, cfg.off_by_more_share))
    assert spread[3] == pytest.approx(0.9)
    assert spread[2] == spread[4] == pytest.approx(0.1 * 0.7 / 2)
    assert spread[1] == spread[5] == pytest.approx(0.1 * 0.2 / 2)
    assert spread[0] == spread[6] == spread[7] == pytest.approx(0.1 * 0.1 / 3)  # the far share, evenly
    assert sum(spread.values()) == pytest.approx(1.0)
    # At the low end the shares go to the side that exists.
    low = dict(error_spread(0, 8, 0, False, 0.1, 0.7, 0.1))
    assert low[1] == pytest.approx(0.07) and -1 not in low


def test_the_record_is_right_when_the_photo_agrees_and_doubted_when_it_does_not():
    cfg = VerdictConfig(error_rate=0.05)
    sure_of_3 = [0.01, 0.01, 0.03, 0.9, 0.04, 0.01]
    assert record_right(3, sure_of_3, cfg=cfg) > 0.99
    # A neighbour the model all but rules out: doubted, though wrong records are rare.
    assert 0.5 < record_right(4, sure_of_3, cfg=cfg) < 0.9
    # More wrong records make the same photo's doubt more believable.
    assert record_right(4, sure_of_3, cfg=VerdictConfig(error_rate=0.3)) < 0.25
    # A record far from what the model sees is doubted too (the far share explains it), not passed.
    far = [0.001, 0.001, 0.001, 0.001, 0.001, 0.995]
    assert record_right(0, far, cfg=cfg) < 0.6 and judge(0, far, cfg=cfg)["verdict"] == "unsure"
    without = VerdictConfig(error_rate=0.05, off_by_more_share=0.0)
    assert judge(0, far, cfg=without)["verdict"] == "match"  # what the far share is for
    assert record_right(9, sure_of_3, cfg=cfg) is None  # no class: no figure
    assert record_prior(9, 6, 0, False, cfg) is None


def test_judge_uses_the_rule_and_the_thresholds_in_force():
    probs = [0.02, 0.08, 0.85, 0.05]
    posterior = judge(1, probs, cfg=VerdictConfig(error_rate=0.2))
    assert posterior["probability_of_expected"] == pytest.approx(0.08)
    assert posterior["verdict"] == ("mismatch" if posterior["probability_record_right"] <= 0.05 else
                                    "match" if posterior["probability_record_right"] >= 0.95 else "unsure")
    old = judge(1, probs, cfg=VerdictConfig(rule="thresholds"))
    assert old["verdict"] == "unsure"  # 0.08: between 0.05 and 0.5
    chosen = {"thresholds": {"flag_threshold": 0.1, "match_threshold": 0.8}}
    assert judge(1, probs, cfg=VerdictConfig(rule="thresholds"), chosen=chosen)["verdict"] == "mismatch"
    # The config's own thresholds win over the chosen ones.
    own = VerdictConfig(rule="thresholds", flag_threshold=0.01, match_threshold=0.5)
    assert judge(1, probs, cfg=own, chosen=chosen)["verdict"] == "unsure"


def test_shares_of_the_error_model_cannot_exceed_one():
    with pytest.raises(ValueError, match="off_by_one_share"):
        VerdictConfig(off_by_one_share=0.9, off_by_more_share=0.2)


def test_count_sets_hold_the_counts_over_the_threshold_and_never_nothing():
    labels = ["0", "1", "2", "3+"]
    assert count_set([0.1, 0.45, 0.4, 0.05], labels, 0.3) == ["1", "2"]
    assert count_set([0.1, 0.25, 0.35, 0.3], labels, 0.9) == ["2"]  # never empty: the most probable
    assert count_set([0.25] * 4, labels, 0.0) == labels
