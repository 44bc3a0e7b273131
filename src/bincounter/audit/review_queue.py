"""The review queue: an audit's bins that people should count first.

Every unsure or flagged bin a person looks at is a labelled photo, the one source of new labels
(the model is data-bound on the real sample). Of those bins, the ones the model is least sure of
(lowest top-class probability, ``confidence`` in ``audit.csv``) teach it the most: uncertainty
sampling. The queue lists them in that order, up to a day's budget, ties broken by id so the same
audit gives the same queue. It holds ids and the order only: what the model or the record said is
left out, so whoever counts from it is not anchored.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from bincounter.audit.outputs import CSV_FILE
from bincounter.config import ReviewQueueConfig
from bincounter.data import bounded
from bincounter.fileio import atomic_write
from bincounter.ids import check_id

QUEUE_COLUMNS = ("position", "id", "uncertainty")
_NEEDED = ("id", "confidence", "verdict")
_SHOWN_SKIPS = 10


@dataclass(frozen=True)
class Queue:
    entries: list[tuple[str, float]]  # (id, uncertainty), most uncertain first
    candidates: int  # bins whose verdict may enter the queue
    skipped: int  # rows that are not an audited bin (malformed, duplicated, too long)
    skipped_examples: list[str] = field(default_factory=list)


def audit_csv(path: str | Path) -> Path:
    """An audit's output folder or its CSV."""
    path = Path(path)
    return path / CSV_FILE if path.is_dir() else path


def build(path: str | Path, cfg: ReviewQueueConfig = ReviewQueueConfig()) -> Queue:
    """The queue from the audit CSV at ``path`` (or the folder holding it). Raises ValueError when
    it is not an audit's CSV; rows that are not an audited bin are skipped and counted."""
    path = audit_csv(path)
    skips: list[str] = []
    header, rows = bounded.csv_rows(path, cfg.max_line_bytes)
    if not set(_NEEDED) <= set(header):
        raise ValueError(f"{path} is not an audit's CSV: no {', '.join(_NEEDED)} in its header "
                         f"({','.join(header)[:200] or 'nothing'})")
    at = {name: header.index(name) for name in _NEEDED}
    seen: set[str] = set()
    chosen: list[tuple[str, float]] = []
    for n, row in rows:
        if isinstance(row, str):
            skips.append(f"line {n}: {row}")
            continue
        try:
            if len(row) < len(header):
                raise ValueError(f"{len(row)} fields, not {len(header)}")
            id_ = check_id(row[at["id"]].strip())
            if id_ in seen:
                raise ValueError(f"bin {id_!r} is listed twice")
            confidence = float(row[at["confidence"]])
            if not 0.0 <= confidence <= 1.0:  # also NaN
                raise ValueError(f"confidence {row[at['confidence']][:40]!r} is not a probability")
            verdict = row[at["verdict"]].strip()
        except ValueError as exc:
            skips.append(f"line {n}: {exc}")
            continue
        seen.add(id_)
        if verdict in cfg.verdicts:
            chosen.append((id_, 1.0 - confidence))
    chosen.sort(key=lambda e: (-e[1], e[0]))
    return Queue(chosen[:cfg.budget], len(chosen), len(skips), skips[:_SHOWN_SKIPS])


def write(queue: Queue, out: str | Path) -> Path:
    """``queue.csv``: position, id, uncertainty; written atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(QUEUE_COLUMNS)
    for position, (id_, uncertainty) in enumerate(queue.entries, start=1):
        writer.writerow([position, id_, f"{uncertainty:.4f}"])
    out = Path(out)
    atomic_write(out, text.getvalue().encode())
    return out
