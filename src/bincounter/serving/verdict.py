"""The verdict rules, in one place: the audit, the one-bin page, the server and evaluation use them.

A model answers class probabilities over counts ``first_count, first_count + 1, ...``; the last
class may stand for "that many or more". Two rules turn them and an expected count into a verdict
(``VerdictConfig``):

- ``posterior``: the probability that the inventory's record is right, given the photo and the
  record. The record is right with probability 1 - e (e: the inventory's error rate); when wrong,
  it is off by one, by two, or (a small share) by three or more, either way. With the model's
  calibrated probabilities p as the evidence of the photo:
  P(right) = (1-e) p[record] / sum_c prior(c) p[c]. The far share keeps a gross error (a record
  of 0 for a bin the model sees 5 in) from passing as a match for want of any explanation.
  A model that is fairly sure of another count flags a bin only when wrong records are common
  enough to explain it, which is what makes flags right.
- ``thresholds``: the model's probability of the expected count alone.

Count sets (``count_set``) are split-conformal sets: the counts whose probability reaches the
threshold fitted on held-out photos, so the set holds the true count at the stated coverage. They
explain an answer ("3 or 4 items"); they do not decide.
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


def class_of(count: int, n_classes: int, first: int, open_ended: bool) -> int | None:
    """The class index of ``count`` (None when the model has no class for it)."""
    index = count - first
    if open_ended and index > n_classes - 1:
        index = n_classes - 1
    return index if 0 <= index < n_classes else None


def probability_of(expected: int, probabilities: Sequence[float], first: int = 0,
                   open_ended: bool = False) -> float | None:
    """The model's probability that the bin holds ``expected`` items.

    None when ``expected`` lies outside the counts the model knows (it cannot judge them);
    with ``open_ended`` the last class takes every count from its own upwards.
    """
    index = class_of(expected, len(probabilities), first, open_ended)
    return None if index is None else float(probabilities[index])


def error_spread(center: int, n_classes: int, first: int, open_ended: bool, error_rate: float,
                 off_by_one_share: float, off_by_more_share: float) -> list[tuple[int, float]]:
    """(count, probability) of the counts one record and one true count can pair: ``center``
    itself with 1 - e; when wrong (e), off by one (its share, split over both sides), by three or
    more (its share, spread evenly over the model's other counts that far away) or else by two.
    Counts below 0 do not exist; a share with no count to go to is left out. Symmetric, so it is
    both P(true count | record) and P(record | true count)."""
    last = first + n_classes - 1  # a pooled last class stands for its own count here
    far = [c for c in range(first, last + 1) if abs(c - center) >= 3]
    out = [(center, 1.0 - error_rate)]
    shares = ((1, off_by_one_share), (2, 1.0 - off_by_one_share - off_by_more_share))
    for distance, share in shares:
        sides = [c for c in (center - distance, center + distance) if c >= 0]
        out += [(c, error_rate * share / len(sides)) for c in sides]
    out += [(c, error_rate * off_by_more_share / len(far)) for c in far]
    return [(c, w) for c, w in out if w > 0]


def record_prior(expected: int, n_classes: int, first: int, open_ended: bool, cfg: VerdictConfig) -> list[float] | None:
    """P(true class | the record says ``expected``) over the model's classes (``error_spread``;
    counts the model has no class for carry no evidence and are left out). None when the record
    itself has no class."""
    if class_of(expected, n_classes, first, open_ended) is None:
        return None
    prior = [0.0] * n_classes
    for count, weight in error_spread(expected, n_classes, first, open_ended, cfg.error_rate, cfg.off_by_one_share,
                                      cfg.off_by_more_share):
        index = class_of(count, n_classes, first, open_ended)
        if index is not None:
            prior[index] += weight
    return prior


def record_right(expected: int, probabilities: Sequence[float], first: int = 0, open_ended: bool = False,
                 cfg: VerdictConfig = VerdictConfig()) -> float | None:
    """P(the record is right | photo, record): the posterior rule's figure (see the module's doc)."""
    prior = record_prior(expected, len(probabilities), first, open_ended, cfg)
    if prior is None:
        return None
    own = class_of(expected, len(probabilities), first, open_ended)
    evidence = sum(q * p for q, p in zip(prior, probabilities))
    if evidence <= 0:
        return 0.0
    return float((1.0 - cfg.error_rate) * probabilities[own] / evidence)


def verdict(figure: float | None, cfg: VerdictConfig = VerdictConfig(), chosen: dict | None = None) -> Verdict:
    """"mismatch" when the rule's figure is at most the flag threshold, "match" when at least the
    match threshold, else "unsure" (``cfg.thresholds(chosen)``). A bin the model cannot judge
    (no figure, or NaN) is "unsure": it goes to a person."""
    if figure is None or math.isnan(figure):
        return "unsure"
    flag, match = cfg.thresholds(chosen)
    if figure <= flag:
        return "mismatch"
    if figure >= match:
        return "match"
    return "unsure"


def judge(expected: int, probabilities: Sequence[float], first: int = 0, open_ended: bool = False,
          cfg: VerdictConfig = VerdictConfig(), chosen: dict | None = None) -> dict:
    """Everything an answer says about one expected count: the model's probability of it, the
    probability that the record is right (posterior rule), and the verdict by ``cfg.rule``."""
    p = probability_of(expected, probabilities, first, open_ended)
    right = record_right(expected, probabilities, first, open_ended, cfg)
    figure = right if cfg.rule == "posterior" else p
    return {"probability_of_expected": p, "probability_record_right": right,
            "verdict": verdict(figure, cfg, chosen)}


def count_set(probabilities: Sequence[float], labels: Sequence[str], threshold: float) -> list[str]:
    """The classes a split-conformal set at ``threshold`` holds (those with probability at least
    ``threshold``, most probable first; never empty)."""
    order = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])
    chosen = [i for i in order if probabilities[i] >= threshold] or order[:1]
    return [str(labels[i]) for i in sorted(chosen)]
