"""The inventory's error rate, estimated from bins people counted.

The verdict's posterior rule needs the share of records that are wrong (``VerdictConfig.error_rate``)
and how wrong they are (off by one or by two). Both come from a CSV of reviewed bins with a header
``id,expected,counted``: the count the record says and the count a person found. The estimate is
the share of wrong records with a Jeffreys interval (the Beta(k + 1/2, n - k + 1/2) quantiles,
good at the small counts a review yields).

The bins must be a random sample of the inventory. Bins people counted because a verdict flagged
them, or because they looked odd, are wrong far more often than the rest: their share says
nothing about the inventory's rate. When unsure between two rates set the higher: a rate set too
low passes wrong bins as matches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from bincounter.config import ErrorRateConfig
from bincounter.data import bounded

HEADER = ("id", "expected", "counted")
_SHOWN_SKIPS = 10


@dataclass(frozen=True)
class ErrorRate:
    reviewed: int  # bins with a usable record and count
    wrong: int
    error_rate: float | None  # None when nothing was reviewed
    low: float | None  # the interval at ``confidence``
    high: float | None
    confidence: float
    off_by_one_share: float | None  # of the wrong records, the share off by one (None: no wrong record)
    off_by_more_share: float | None  # ... and the share off by three or more
    skipped: int  # rows that are not a reviewed bin (malformed, duplicated, too long)
    skipped_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def jeffreys_interval(wrong: int, reviewed: int, confidence: float) -> tuple[float, float]:
    """The Jeffreys interval of a binomial share (0 and 1 at the ends, as usual)."""
    from scipy.stats import beta

    tail = (1.0 - confidence) / 2
    low = 0.0 if wrong == 0 else float(beta.ppf(tail, wrong + 0.5, reviewed - wrong + 0.5))
    high = 1.0 if wrong == reviewed else float(beta.ppf(1 - tail, wrong + 0.5, reviewed - wrong + 0.5))
    return low, high


def _count(text: str, what: str, cfg: ErrorRateConfig) -> int:
    value = int(text.strip())  # ValueError for anything but an integer
    if not 0 <= value <= cfg.max_count:
        raise ValueError(f"{what} {value} is outside 0..{cfg.max_count}")
    return value


def estimate(path: str | Path, cfg: ErrorRateConfig = ErrorRateConfig()) -> ErrorRate:
    """The error rate of the reviewed bins in the CSV at ``path``. Raises ValueError when the file
    is not such a CSV (no ``id,expected,counted`` header); rows that are not a reviewed bin are
    skipped and counted, with the first few reasons kept."""
    skips: list[str] = []
    header, rows = bounded.csv_rows(path, cfg.max_line_bytes, complete=True)
    if not set(HEADER) <= set(header):
        raise ValueError(f"{path} has no header {','.join(HEADER)} (it has {','.join(header)[:200] or 'nothing'})")
    at = {name: header.index(name) for name in HEADER}
    seen: set[str] = set()
    reviewed = wrong = off_by_one = off_by_more = 0
    for n, row in rows:
        if isinstance(row, str):
            skips.append(f"line {n}: {row}")
            continue
        try:
            id_ = row[at["id"]].strip()
            if not id_ or id_ in seen:
                raise ValueError("no id" if not id_ else f"bin {id_[:60]!r} is listed twice")
            expected = _count(row[at["expected"]], "expected", cfg)
            counted = _count(row[at["counted"]], "counted", cfg)
        except ValueError as exc:
            skips.append(f"line {n}: {exc}")
            continue
        seen.add(id_)
        reviewed += 1
        off = abs(expected - counted)
        if off:
            wrong += 1
            off_by_one += off == 1
            off_by_more += off > 2
    if reviewed == 0:
        return ErrorRate(0, 0, None, None, None, cfg.confidence, None, None, len(skips), skips[:_SHOWN_SKIPS])
    low, high = jeffreys_interval(wrong, reviewed, cfg.confidence)
    return ErrorRate(reviewed, wrong, wrong / reviewed, low, high, cfg.confidence,
                     off_by_one / wrong if wrong else None, off_by_more / wrong if wrong else None, len(skips),
                     skips[:_SHOWN_SKIPS])
