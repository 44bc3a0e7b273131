"""The verdict rule, in one place: the audit, the one-bin page and the server all use it.

A model answers class probabilities over counts ``first_count, first_count + 1, ...``; the
last class may stand for "that many or more". The verdict compares the probability of the
expected count with two thresholds (``VerdictConfig``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from bincounter.config import VerdictConfig

Verdict = Literal["match", "mismatch", "unsure"]
VERDICTS: tuple[Verdict, ...] = ("match", "mismatch", "unsure")


def first_count(count: int, probabilities: Sequence[float]) -> int:
    """The count of class 0, from a prediction's ``count`` (its argmax class) and probabilities.

    Every endpoint answers these two, so neither the page nor a remote client needs the
    model's spec to tell which count each probability belongs to.
    """
    best = max(range(len(probabilities)), key=lambda i: probabilities[i])
    return int(count) - best


def probability_of(expected: int, probabilities: Sequence[float], first: int = 0,
                   open_ended: bool = False) -> float | None:
    """The model's probability that the bin holds ``expected`` items.

    None when ``expected`` lies outside the counts the model knows (it cannot judge them);
    with ``open_ended`` the last class takes every count from its own upwards.
    """
    index = expected - first
    last = len(probabilities) - 1
    if open_ended and index > last:
        index = last
    if index < 0 or index > last:
        return None
    return float(probabilities[index])


def verdict(p_expected: float | None, cfg: VerdictConfig = VerdictConfig()) -> Verdict:
    """"mismatch" when p <= flag threshold, "match" when p >= match threshold, else "unsure".

    A bin the model cannot judge (p is None or NaN) is "unsure": it goes to a person.
    """
    if p_expected is None or math.isnan(p_expected):
        return "unsure"
    if p_expected <= cfg.flag_threshold:
        return "mismatch"
    if p_expected >= cfg.match_threshold:
        return "match"
    return "unsure"
