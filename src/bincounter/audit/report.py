"""The audit's ``report.html``: one self-contained page (thumbnails inlined) for a person
and for KFP's HTML artifact viewer."""

from __future__ import annotations

import base64
from html import escape

from bincounter.config import AuditConfig

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1b1b1b;max-width:70rem}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}
th,td{border-bottom:1px solid #ddd;padding:.35rem .6rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.bars{display:grid;grid-template-columns:7.5rem 8rem auto;gap:1px .4rem;font-size:.8rem;align-items:center}
.bar{height:.7rem;background:#5b7db1}
.bar.expected{background:#c0392b}
.note{color:#555;max-width:50rem}
img{border-radius:3px}
"""


def _pct(p: float | None) -> str:
    return "n/a" if p is None else f"{100 * p:.1f}%"


def _bars(item: dict) -> str:
    """The count probabilities as small bars; the expected count's bar is red."""
    rows = []
    last = len(item["probabilities"]) - 1
    for i, p in enumerate(item["probabilities"]):
        count = item["first_count"] + i
        cls = "bar expected" if count == item["expected"] else "bar"
        name = f"{count}" + (" (predicted)" if count == item["predicted"] else "")
        name += " (expected)" if count == item["expected"] else ""
        rows.append(f"<span>{escape(name)}</span><span class='{cls}' style='width:{max(1.0, 100 * p):.0f}%'"
                    f" role='img' aria-label='{count}: {_pct(p)}'></span><span>{_pct(p)}</span>")
        if i == last and item["expected"] > count:
            rows.append(f"<span>{item['expected']} (expected)</span><span></span><span>outside the model's counts</span>")
    return f"<div class='bars'>{''.join(rows)}</div>"


def _table(items: list[dict], what: str) -> str:
    if not items:
        return f"<p>No {what}.</p>"
    head = ("<tr><th>#</th><th>photo</th><th>bin id</th><th>expected</th><th>predicted</th>"
            "<th>probability of expected</th><th>P(record right)</th><th>confidence</th>"
            "<th>count probabilities</th></tr>")
    body = []
    for rank, item in enumerate(items, start=1):
        thumb = item.get("thumbnail")
        img = (f"<img alt='bin {escape(item['id'])}' src='data:image/jpeg;base64,{base64.b64encode(thumb).decode()}'>"
               if thumb else "no thumbnail")
        body.append(
            f"<tr><td class='num'>{rank}</td><td>{img}</td><td>{escape(item['id'])}</td>"
            f"<td class='num'>{item['expected']}</td><td class='num'>{item['predicted']}</td>"
            f"<td class='num'>{_pct(item['probability_of_expected'])}</td>"
            f"<td class='num'>{_pct(item.get('probability_record_right'))}</td><td class='num'>{_pct(item['confidence'])}</td>"
            f"<td>{_bars(item)}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def settings_line(summary) -> str:
    """What the verdicts assumed: the rule, the error rate, the thresholds and where they came from."""
    flag, match = f"{summary.flag_threshold:.4g}", f"{summary.match_threshold:.4g}"
    if summary.rule == "posterior":
        rule = (f"With P the probability that the inventory's count is right given the photo and an inventory error "
                f"rate of {_pct(summary.error_rate)}: <b>mismatch</b> when P &le; {flag}, <b>match</b> when P &ge; "
                f"{match}, otherwise <b>unsure</b> (a person decides).")
    else:
        rule = (f"With p the model's probability of the expected count: <b>mismatch</b> when p &le; {flag}, "
                f"<b>match</b> when p &ge; {match}, otherwise <b>unsure</b> (a person decides).")
    return f"{rule} Thresholds from {escape(summary.thresholds_from, quote=False)}."


def evaluated_line(summary) -> str:
    """What the settings did on held-out photos, or why that is not known."""
    if summary.evaluated_settled is None:
        return f"Held-out figures of these settings: {escape(summary.evaluation)}."
    return (f"On the model's held-out test photos against an inventory with {_pct(summary.error_rate)} wrong records, "
            f"these settings flagged with a precision of <b>{_pct(summary.evaluated_flag_precision)}</b>, passed "
            f"<b>{_pct(summary.evaluated_wrong_passed)}</b> of the wrong records as matches and settled "
            f"{_pct(summary.evaluated_settled)} of the bins without a person (from {escape(summary.evaluation)}). "
            "They hold if the error rate is right: set it from bins people counted (bincounter error-rate).")


def render(summary, flagged: list[dict], unsure: list[dict], cal, cfg: AuditConfig) -> str:
    """The report: summary, settings and what they are expected to do, flagged bins (surest first), unsure bins."""
    if summary.expected_flag_precision is not None:
        precision = (f"<b>at least {_pct(summary.expected_flag_precision)}</b> of the flagged bins are expected to be "
                     "really wrong. Per flag this takes how often the model's count was right at the same "
                     f"confidence on {cal.photos} held-out photos (a flag is right whenever the model's count is "
                     "right and differs from the expected one; it can also be right when both are wrong, which "
                     f"the bound leaves out). Calibration from {escape(cal.origin)}.")
    elif cal is not None:
        precision = "no bin was flagged, so there is no precision to expect."
    else:
        precision = (f"<b>unavailable</b>: no held-out calibration for this model ({escape(summary.calibration)}). "
                     "The flags are the model's own probabilities, not checked against held-out photos.")
    rows = [("bins checked", summary.checked), ("mismatches (flagged)", summary.mismatches),
            ("unsure (for a person)", summary.unsure), ("matches", summary.matches),
            ("could not be checked (see audit_errors.csv)", summary.errors),
            ("counted by this run (the rest resumed from the journal)", summary.counted_now)]
    stats = "".join(f"<tr><th>{escape(k)}</th><td class='num'>{v}</td></tr>" for k, v in rows)
    shown = f" (the {cfg.report_limit} surest shown)" if summary.mismatches > len(flagged) else ""
    shown_unsure = f" (the {cfg.report_limit} least likely shown)" if summary.unsure > len(unsure) else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Bin audit</title><style>{_STYLE}</style></head><body>
<h1>Bin audit</h1>
<p class="note">Source {escape(cfg.source.uri)}; counted by {escape(summary.counter)}.
{settings_line(summary)}</p>
<table>{stats}</table>
<p class="note">{evaluated_line(summary)}</p>
<p class="note">Expected precision of the flags from the model's held-out reliability: {precision}</p>
<h2>Flagged bins{shown}, surest first</h2>
{_table(flagged, "flagged bins")}
<h2>Unsure bins{shown_unsure}</h2>
{_table(unsure, "unsure bins")}
</body></html>
"""
