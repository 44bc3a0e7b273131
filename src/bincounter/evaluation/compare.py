"""Paired comparison of two models on the same test photos: accuracy, RMSE and McNemar's exact
test on the photos exactly one of them counted right, pooled over seeds.

Each side is one or more evaluation folders (or their ``predictions.csv``), paired in order: the
candidate's seed 0 with the baseline's seed 0, and so on. Photos either model's server refused
(an empty answer) are left out of that pair and counted.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class PairResult:
    candidate: str
    baseline: str
    photos: int
    left_out: int  # refused by either side's server
    candidate_accuracy: float
    baseline_accuracy: float
    candidate_rmse: float
    baseline_rmse: float
    only_candidate_right: int
    only_baseline_right: int
    p_value: float


@dataclass(frozen=True)
class Comparison:
    pairs: list[PairResult]
    candidate_accuracy: float  # mean over the pairs, as docs/accuracy.md's tables report seeds
    baseline_accuracy: float
    candidate_rmse: float
    baseline_rmse: float
    only_candidate_right: int  # summed over the pairs
    only_baseline_right: int
    p_value: float  # McNemar's exact test on the summed counts

    def to_dict(self) -> dict:
        return asdict(self)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: under 'equally good', the discordant photos split like
    fair coin flips."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


def read_predictions(path: str | Path) -> dict[str, tuple[int, int | None]]:
    """id -> (true label, predicted label or None where the server refused the photo)."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions.csv (the output folder of `bincounter evaluate`)")
    rows: dict[str, tuple[int, int | None]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"id", "true_label", "predicted_label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not an evaluation's predictions.csv (no column {', '.join(sorted(missing))})")
        for line, row in enumerate(reader, start=2):
            try:
                answer = row["predicted_label"].strip()
                value = (int(row["true_label"]), int(answer) if answer else None)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line}: unreadable label ({e})") from None
            if row["id"] in rows:
                raise ValueError(f"{path}:{line}: photo {row['id']!r} appears twice")
            rows[row["id"]] = value
    if not rows:
        raise ValueError(f"{path}: no predictions")
    return rows


def compare_pair(candidate: str | Path, baseline: str | Path) -> PairResult:
    a, b = read_predictions(candidate), read_predictions(baseline)
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())
        raise ValueError(f"{candidate} and {baseline} scored different photos ({len(only)} differ, e.g. "
                         f"{only[:3]}): compare evaluations of the same test split")
    differ = [i for i in a if a[i][0] != b[i][0]]
    if differ:
        raise ValueError(f"{candidate} and {baseline} disagree on the true count of {len(differ)} photos "
                         f"(e.g. {differ[:3]}): they were not made from the same data")
    both = [i for i in a if a[i][1] is not None and b[i][1] is not None]
    if not both:
        raise ValueError(f"{candidate} and {baseline}: no photo was answered by both")
    truth = [a[i][0] for i in both]
    pa, pb = [a[i][1] for i in both], [b[i][1] for i in both]
    right_a = [p == t for p, t in zip(pa, truth)]
    right_b = [p == t for p, t in zip(pb, truth)]
    only_a = sum(x and not y for x, y in zip(right_a, right_b))
    only_b = sum(y and not x for x, y in zip(right_a, right_b))
    n = len(both)
    return PairResult(
        candidate=str(candidate), baseline=str(baseline), photos=n, left_out=len(a) - n,
        candidate_accuracy=sum(right_a) / n, baseline_accuracy=sum(right_b) / n,
        candidate_rmse=_rmse(pa, truth), baseline_rmse=_rmse(pb, truth),
        only_candidate_right=only_a, only_baseline_right=only_b, p_value=mcnemar_p(only_a, only_b))


def compare(candidates: list[str | Path], baselines: list[str | Path]) -> Comparison:
    if not candidates or len(candidates) != len(baselines):
        raise ValueError(f"give as many baseline evaluations as candidate ones, paired by seed "
                         f"(got {len(candidates)} and {len(baselines)})")
    pairs = [compare_pair(c, b) for c, b in zip(candidates, baselines)]
    only_a = sum(p.only_candidate_right for p in pairs)
    only_b = sum(p.only_baseline_right for p in pairs)
    return Comparison(
        pairs=pairs,
        candidate_accuracy=statistics.fmean(p.candidate_accuracy for p in pairs),
        baseline_accuracy=statistics.fmean(p.baseline_accuracy for p in pairs),
        candidate_rmse=statistics.fmean(p.candidate_rmse for p in pairs),
        baseline_rmse=statistics.fmean(p.baseline_rmse for p in pairs),
        only_candidate_right=only_a, only_baseline_right=only_b, p_value=mcnemar_p(only_a, only_b))


def _rmse(predicted: list[int], truth: list[int]) -> float:
    return math.sqrt(sum((p - t) ** 2 for p, t in zip(predicted, truth)) / len(truth))
