"""The review queue: an audit's bins that people should count first.

Every unsure or flagged bin a person looks at is a labelled photo, the one source of new labels
(the model is data-bound on the real sample). Of those bins, the ones the model is least sure of
(lowest top-class probability, ``confidence`` in ``audit.csv``) teach it the most: uncertainty
sampling. The queue lists them in that order, up to a day's budget, ties broken by id so the same
audit gives the same queue. It holds ids, the order and the model version that asked (the audit's
counter, from its ``summary.json``) only: what the model or the record said is left out, so
whoever counts from it is not anchored. ``bincounter review`` serves it (:func:`read`).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from bincounter.audit.outputs import CSV_FILE, SUMMARY_FILE
from bincounter.config import ReviewQueueConfig
from bincounter.data import bounded
from bincounter.fileio import atomic_write
from bincounter.ids import check_id

QUEUE_COLUMNS = ("position", "id", "uncertainty", "model")
_NEEDED = ("id", "confidence", "verdict")
_SHOWN_SKIPS = 10


@dataclass(frozen=True)
class Queue:
    entries: list[tuple[str, float]]  # (id, uncertainty), most uncertain first
    candidates: int  # bins whose verdict may enter the queue
    skipped: int  # rows that are not an audited bin (malformed, duplicated, too long)
    skipped_examples: list[str] = field(default_factory=list)
    model: str = ""  # the model version that counted the audit (its summary's counter)


@dataclass(frozen=True)
class QueuedBin:
    """One bin of a queue.csv, as ``bincounter review`` hands it out."""

    id: str
    position: int
    uncertainty: float
    model: str


def audit_csv(path: str | Path) -> Path:
    """An audit's output folder or its CSV."""
    path = Path(path)
    return path / CSV_FILE if path.is_dir() else path


def _counter_of(folder: Path) -> str:
    """The model version an audit counted with (its summary.json), or "" when unknown."""
    try:
        summary = bounded.loads(bounded.read_file(folder / SUMMARY_FILE, root=folder, max_bytes=2**20),
                                max_bytes=2**20, max_depth=8, what=SUMMARY_FILE)
    except (OSError, ValueError):
        return ""
    counter = summary.get("counter") if isinstance(summary, dict) else None
    return counter[:200] if isinstance(counter, str) and counter.isprintable() else ""


def build(path: str | Path, cfg: ReviewQueueConfig = ReviewQueueConfig()) -> Queue:
    """The queue from the audit CSV at ``path`` (or the folder holding it). Raises ValueError when
    it is not an audit's CSV; rows that are not an audited bin are skipped and counted."""
    path = audit_csv(path)
    skips: list[str] = []
    header, rows = bounded.csv_rows(path, cfg.max_line_bytes, complete=True)
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
    if cfg.reviews.uri:
        chosen = _after_earlier_answers(chosen, cfg)
    return Queue(chosen[:cfg.budget], len(chosen), len(skips), skips[:_SHOWN_SKIPS], _counter_of(path.parent))


def _after_earlier_answers(chosen: list[tuple[str, float]], cfg: ReviewQueueConfig) -> list[tuple[str, float]]:
    """The queue once earlier answers (``cfg.reviews``) are read: bins they settled, or that too many
    people could not count, leave it; bins whose answers disagree (or want more agreeing ones) come
    first, audited today or not (a bin not in this audit has no uncertainty: NaN). A reviews file
    that cannot be read keeps its bin where the audit put it (the page leaves it out, says why)."""
    from bincounter.data.reviews import open_reviews, settle

    store = open_reviews(cfg.reviews)
    uncertainty = dict(chosen)
    done: set[str] = set()
    again: list[tuple[str, float]] = []
    for id_ in store.ids():
        try:
            answers = store.answers(id_)
        except ValueError:  # InvalidReview, bounded.Refused
            continue
        status = settle(answers, agreeing=cfg.agreeing, cant_tell_limit=cfg.cant_tell_limit).status
        if status in ("settled", "unreadable"):
            done.add(id_)
        elif any(a.count is not None for a in answers):
            again.append((id_, uncertainty.get(id_, float("nan"))))
    first = {id_ for id_, _ in again}
    return again + [e for e in chosen if e[0] not in done and e[0] not in first]


def write(queue: Queue, out: str | Path) -> Path:
    """``queue.csv``: position, id, uncertainty, model; written atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(QUEUE_COLUMNS)
    for position, (id_, uncertainty) in enumerate(queue.entries, start=1):
        writer.writerow([position, id_, f"{uncertainty:.4f}", queue.model])
    out = Path(out)
    atomic_write(out, text.getvalue().encode())
    return out


def read(path: str | Path, max_line_bytes: int = 64 * 2**10) -> tuple[list[QueuedBin], list[str]]:
    """The bins of a ``queue.csv`` in its order, and the lines skipped (with why): ids that are
    not dataset ids, repeated ids, positions or uncertainties that are not numbers. Raises
    ValueError when the file is not a queue (no id column)."""
    header, rows = bounded.csv_rows(path, max_line_bytes)
    if "id" not in header:
        raise ValueError(f"{path} is not a review queue: no id column in its header ({','.join(header)[:200]})")
    at = {name: header.index(name) for name in QUEUE_COLUMNS if name in header}
    bins: list[QueuedBin] = []
    skips: list[str] = []
    seen: set[str] = set()
    for n, row in rows:
        if isinstance(row, str):
            skips.append(f"line {n}: {row}")
            continue
        try:
            cell = {name: row[i].strip() if i < len(row) else "" for name, i in at.items()}
            id_ = check_id(cell["id"])
            if id_ in seen:
                raise ValueError(f"bin {id_!r} is listed twice")
            uncertainty = float(cell.get("uncertainty") or "nan")
            model = cell.get("model", "")
            if not model.isprintable() or len(model) > 200:
                raise ValueError("its model is not a printable version of at most 200 characters")
        except ValueError as exc:
            skips.append(f"line {n}: {exc}")
            continue
        seen.add(id_)
        bins.append(QueuedBin(id_, len(bins) + 1, uncertainty, model))
    return bins, skips
