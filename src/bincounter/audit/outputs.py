"""The audit's output files, written from its journal in one streaming pass: ``audit.csv``
and ``audit.parquet`` (one row per bin, sorted by id), ``audit_errors.csv``, ``summary.json``
and ``report.html``. Verdicts are derived here from the stored probabilities, so the
thresholds can change without counting anything again."""

from __future__ import annotations

import csv
import heapq
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bincounter.config import AuditConfig
from bincounter.serving.verdict import VERDICTS, judge

CSV_FILE = "audit.csv"
PARQUET_FILE = "audit.parquet"
ERRORS_FILE = "audit_errors.csv"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
COLUMNS = ("id", "expected", "predicted", "probability_of_expected", "probability_record_right", "confidence",
           "verdict")


@dataclass(frozen=True)
class AuditSummary:
    """What the audit found; written to ``summary.json``, logged to MLflow and KFP."""

    checked: int
    matches: int
    mismatches: int
    unsure: int
    errors: int
    counted_now: int  # bins counted by this run (the rest came from the journal)
    rule: str  # the verdict rule (VerdictConfig.rule)
    error_rate: float  # the inventory error rate the verdicts assume
    flag_threshold: float  # the thresholds in force
    match_threshold: float
    thresholds_from: str  # "the audit's settings", "the model's evaluation" or "the rule's defaults"
    expected_flag_precision: float | None  # None when no calibration (or no flags)
    calibration: str  # where the calibration came from, or why there is none
    counter: str  # the model version or server URL that counted
    # What these settings did on the model's held-out test photos against an inventory with this
    # error rate (evaluation.verdicts' figures); None when the model has none or other thresholds run.
    evaluated_flag_precision: float | None = None
    evaluated_wrong_passed: float | None = None
    evaluated_settled: float | None = None
    evaluation: str = ""  # where those figures came from, or why there are none

    def metrics(self) -> dict[str, float]:
        """The numeric figures (for KFP ``Metrics`` and MLflow)."""
        out = {k: float(v) for k, v in asdict(self).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
        return out


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def evaluated(cfg: AuditConfig, verdicts: dict | None, origin: str) -> tuple[dict | None, str, str]:
    """(the held-out figures of the settings in force, where they come from, where the thresholds come from)."""
    from bincounter.evaluation.verdicts import figures_at

    chosen = (verdicts or {}).get("chosen", {})
    own = cfg.verdict.flag_threshold is not None and cfg.verdict.match_threshold is not None
    source = "the audit's settings" if own else ("the model's evaluation" if chosen.get(cfg.verdict.rule)
                                                 else "the rule's defaults")
    if verdicts is None:
        return None, f"unavailable: {origin}", source
    spread = (cfg.verdict.off_by_one_share, cfg.verdict.off_by_more_share)
    if source != "the model's evaluation" or spread != (verdicts.get("off_by_one_share"),
                                                         verdicts.get("off_by_more_share")):
        return None, ("unavailable: the thresholds or the spread of wrong records in force are not those evaluation "
                      f"chose and measured ({origin})"), source
    return figures_at(verdicts, cfg.verdict.rule, cfg.verdict.error_rate), origin, source


def write_outputs(journal, out: Path, cfg: AuditConfig, cal, origin: str, counter: str,
                  counted_now: int, verdicts: dict | None = None, verdicts_origin: str = "not looked up") -> AuditSummary:
    """CSV, Parquet, errors, summary and report from the journal, in one streaming pass."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bincounter.audit.report import render

    schema = pa.schema([("id", pa.string()), ("expected", pa.int64()), ("predicted", pa.int64()),
                        ("probability_of_expected", pa.float64()), ("probability_record_right", pa.float64()),
                        ("confidence", pa.float64()), ("verdict", pa.string())])
    chosen = (verdicts or {}).get("chosen", {})
    flag_threshold, match_threshold = cfg.verdict.thresholds(chosen)
    tallies = dict.fromkeys(VERDICTS, 0)
    precision_sum = 0.0
    flagged: list[tuple] = []  # the report_limit surest mismatches (a heap)
    unsure: list[tuple] = []
    tmp_csv, tmp_parquet = out / f".{CSV_FILE}.part", out / f".{PARQUET_FILE}.part"
    with open(tmp_csv, "w", newline="", encoding="utf-8") as f, pq.ParquetWriter(tmp_parquet, schema) as pw:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        chunk: list[tuple] = []

        def flush() -> None:
            if chunk:
                pw.write_table(pa.Table.from_pylist([dict(zip(COLUMNS, r)) for r in chunk], schema=schema))
                chunk.clear()

        for id_, expected, predicted, p, confidence, probs, first, pooled in journal.rows():
            judged = judge(expected, json.loads(probs), first, bool(pooled), cfg.verdict, chosen)
            v, right = judged["verdict"], judged["probability_record_right"]
            figure = right if cfg.verdict.rule == "posterior" else p
            tallies[v] += 1
            record = (id_, expected, predicted, p, right, confidence, v)
            writer.writerow([_fmt(x) for x in record])
            chunk.append(record)
            if len(chunk) >= 10_000:
                flush()
            if v == "mismatch":
                if cal is not None:
                    precision_sum += cal.flag_right(confidence, predicted, expected)
                # Surest first: the lowest figure of the rule, then the most confident.
                _keep(flagged, (-figure, confidence, id_), cfg.report_limit)
            elif v == "unsure":
                _keep(unsure, (-(1.0 if figure is None else figure), confidence, id_), cfg.report_limit)
        flush()
    os.replace(tmp_csv, out / CSV_FILE)
    os.replace(tmp_parquet, out / PARQUET_FILE)

    errors = 0
    tmp_err = out / f".{ERRORS_FILE}.part"
    with open(tmp_err, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("id", "reason"))
        for id_, reason in journal.errors():
            writer.writerow((id_, reason))
            errors += 1
    os.replace(tmp_err, out / ERRORS_FILE)

    mismatches = tallies["mismatch"]
    if cal is None:
        precision, calibration_note = None, f"unavailable: {origin}"
    else:
        precision, calibration_note = (precision_sum / mismatches if mismatches else None), origin
    held_out, evaluation_note, thresholds_from = evaluated(cfg, verdicts, verdicts_origin)
    summary = AuditSummary(
        checked=sum(tallies.values()), matches=tallies["match"], mismatches=mismatches, unsure=tallies["unsure"],
        errors=errors, counted_now=counted_now, rule=cfg.verdict.rule, error_rate=cfg.verdict.error_rate,
        flag_threshold=flag_threshold, match_threshold=match_threshold, thresholds_from=thresholds_from,
        expected_flag_precision=precision, calibration=calibration_note, counter=counter,
        evaluated_flag_precision=(held_out or {}).get("flag_precision"),
        evaluated_wrong_passed=(held_out or {}).get("wrong_passed"),
        evaluated_settled=(held_out or {}).get("settled"), evaluation=evaluation_note)
    _atomic_text(out / SUMMARY_FILE, json.dumps(asdict(summary), indent=2))
    _atomic_text(out / REPORT_FILE, render(summary, _details(journal, flagged, cfg, chosen), _details(journal, unsure, cfg, chosen),
                                           cal, cfg))
    return summary


def _keep(heap: list[tuple], rank: tuple, limit: int) -> None:
    """Keep in ``heap`` the ``limit`` largest ranks; the root is the smallest kept, first to go."""
    if limit <= 0:
        return
    if len(heap) < limit:
        heapq.heappush(heap, rank)
    elif rank > heap[0]:
        heapq.heapreplace(heap, rank)


def _details(journal, heap: list[tuple], cfg: AuditConfig, chosen: dict) -> list[dict]:
    """The kept bins, surest first, with what the report shows."""
    out = []
    for _, _, id_ in sorted(heap, reverse=True):
        row = journal.db.execute("SELECT id, expected, predicted, probability_of_expected, confidence, "
                                 "probabilities, first_count, thumbnail, open_ended FROM bins WHERE id = ?",
                                 (id_,)).fetchone()
        keys = ("id", "expected", "predicted", "probability_of_expected", "confidence", "probabilities",
                "first_count", "thumbnail", "open_ended")
        item = dict(zip(keys, row))
        item["probabilities"] = json.loads(item["probabilities"])
        item["probability_record_right"] = judge(item["expected"], item["probabilities"], item["first_count"],
                                                 bool(item["open_ended"]), cfg.verdict,
                                                 chosen)["probability_record_right"]
        out.append(item)
    return out


def _atomic_text(path: Path, text: str) -> None:
    from bincounter.fileio import atomic_write

    atomic_write(path, text.encode("utf-8"))

