"""What verdicts would do on the floor: held-out photos against a simulated inventory.

Each test photo's true count is known; the inventory's record of it is right with probability
1 - e, else off by one, by two or by more, as ``VerdictConfig`` says (``serving.verdict.error_spread``). Weighting every (photo, record) pair by
that probability gives the exact expected figures of a verdict rule at an error rate, without
sampling noise:

- flag precision: of the bins flagged as mismatches, the share whose record is wrong;
- flag recall: of the wrong records, the share flagged;
- wrong passed: of the wrong records, the share called a match (passed without a person);
- settled: the share of bins flagged or matched (not sent to a person).

``choose`` picks the thresholds that meet a target flag precision and a ceiling on wrong passed
while settling the most bins; evaluation stores them with the model, and the server and the audit
use them by default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from bincounter.config import VerdictConfig
from bincounter.serving.verdict import error_spread, probability_of, record_right

RATES = (0.01, 0.05, 0.20)  # the error rates the figures are reported at
# The error rates the stored figures cover (the audit reads its own rate's figures off them).
GRID = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
# (target flag precision, max wrong passed): the choices the report lays side by side.
TARGETS = ((0.90, 0.10), (0.95, 0.05), (0.99, 0.02))


@dataclass(frozen=True)
class Pairs:
    """Every (photo, possible record) with its weight, its rule figure and whether it is wrong."""

    weight: np.ndarray
    figure: np.ndarray  # NaN where the model cannot judge the record (no class for it)
    wrong: np.ndarray


@dataclass(frozen=True)
class Figures:
    flag_precision: float | None  # None when nothing is flagged
    flag_recall: float
    wrong_passed: float
    settled: float
    false_flags: float  # of the right records, the share flagged

    def to_dict(self) -> dict:
        return asdict(self)


def simulated_records(truth: int, n_classes: int, first: int, open_ended: bool,
                      cfg: VerdictConfig) -> list[tuple[int, float]]:
    """(record, probability) of what an inventory with ``cfg``'s error model says for a bin holding ``truth``."""
    return error_spread(truth, n_classes, first, open_ended, cfg.error_rate, cfg.off_by_one_share,
                        cfg.off_by_more_share)


def pairs(truth_counts: np.ndarray, probs: np.ndarray, first: int, open_ended: bool, cfg: VerdictConfig) -> Pairs:
    """The weighted (photo, record) pairs of ``truth_counts`` under ``cfg``'s error model and rule."""
    weight, figure, wrong = [], [], []
    for truth, p in zip(truth_counts.tolist(), probs):
        p = p.tolist()
        for record, w in simulated_records(int(truth), len(p), first, open_ended, cfg):
            if cfg.rule == "posterior":
                value = record_right(record, p, first, open_ended, cfg)
            else:
                value = probability_of(record, p, first, open_ended)
            weight.append(w)
            figure.append(np.nan if value is None else value)
            # A record the model pools with the truth ("7" for a "6+" bin of 8) is still a wrong record.
            wrong.append(record != truth)
    return Pairs(np.array(weight), np.array(figure), np.array(wrong, dtype=bool))


def figures(pairs_: Pairs, flag: float, match: float) -> Figures:
    """The expected figures of thresholds (flag, match) on the weighted pairs."""
    w, f, wrong = pairs_.weight, pairs_.figure, pairs_.wrong
    judged = ~np.isnan(f)
    flagged = judged & (f <= flag)
    matched = judged & (f >= match)
    wrong_mass, right_mass = w[wrong].sum(), w[~wrong].sum()
    flagged_mass = w[flagged].sum()
    return Figures(
        flag_precision=float(w[flagged & wrong].sum() / flagged_mass) if flagged_mass > 0 else None,
        flag_recall=float(w[flagged & wrong].sum() / wrong_mass) if wrong_mass > 0 else 0.0,
        wrong_passed=float(w[matched & wrong].sum() / wrong_mass) if wrong_mass > 0 else 0.0,
        settled=float(w[flagged | matched].sum() / w.sum()),
        false_flags=float(w[flagged & ~wrong].sum() / right_mass) if right_mass > 0 else 0.0)


def wilson(share: np.ndarray, n: np.ndarray, z: float, upper: bool) -> np.ndarray:
    """Wilson's bound of a share seen over ``n`` (effective) photos, one-sided at ``z``."""
    n = np.maximum(n, 1e-12)
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre + half if upper else centre - half


def choose(pairs_: Pairs, target_precision: float, max_wrong_passed: float, confidence: float = 0.9) -> dict:
    """Thresholds meeting both targets that settle the most bins: the flag threshold flagging the
    most mass whose flag precision is at least ``target_precision`` (none flagged if no threshold
    reaches it), and the lowest match threshold passing at most ``max_wrong_passed`` of the wrong
    records as matches (none matched if none does).

    "At least" with ``confidence``: the flag threshold lies where few photos are, so precision read
    off the photos at hand would not hold on the next ones. Precision is wrong mass flagged over
    all mass flagged; it is taken with the share of wrong records flagged at its lower Wilson
    bound (over the wrong records' effective number, Kish's, from their weights) and the share of
    right records flagged at its upper bound (over the photos: one right record each). Likewise
    the share of wrong records passed is taken at its upper bound."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(confidence)
    w, f, wrong = pairs_.weight, pairs_.figure, pairs_.wrong
    keep = ~np.isnan(f)
    w, f, wrong = w[keep], f[keep], wrong[keep]
    order = np.argsort(f, kind="stable")
    fs, ws, wr = f[order], w[order], wrong[order]
    candidates = np.unique(fs)
    wrong_w = ws * wr
    wrong_total, right_total = wrong_w.sum(), (ws * ~wr).sum()
    wrong_effective = wrong_total ** 2 / (wrong_w ** 2).sum() if wrong_total > 0 else 0.0
    rights = int((~wr).sum())
    # Flag threshold t flags every pair with figure <= t: cumulative sums over the sorted figures.
    last = np.searchsorted(fs, candidates, side="right") - 1
    flagged = np.cumsum(ws)[last]
    wrong_share = np.cumsum(wrong_w)[last] / wrong_total if wrong_total > 0 else np.zeros(len(candidates))
    right_share = np.cumsum(~wr)[last] / max(rights, 1)
    wrong_low = wilson(wrong_share, np.full(len(candidates), wrong_effective), z, upper=False).clip(0, 1)
    right_high = wilson(right_share, np.full(len(candidates), rights), z, upper=True).clip(0, 1)
    found = wrong_total * wrong_low
    precision_low = np.divide(found, found + right_total * right_high, out=np.zeros_like(found),
                              where=found + right_total * right_high > 0)
    ok = precision_low >= target_precision
    flag = float(candidates[ok][np.argmax(flagged[ok])]) if ok.any() else -1.0  # -1: flag nothing
    # Match threshold t matches every pair with figure >= t.
    above = np.cumsum(wrong_w[::-1])[::-1]  # wrong mass at or above each sorted position
    passed = above[np.searchsorted(fs, candidates, side="left")] / wrong_total if wrong_total > 0 else \
        np.zeros(len(candidates))
    fine = wilson(passed, np.full(len(candidates), wrong_effective), z, upper=True) <= max_wrong_passed
    match = float(candidates[fine].min()) if fine.any() else 1.0 + 1e-9
    if match <= flag:  # targets that ask both of the same bins: a person looks at the band between
        match = float(np.nextafter(flag, 2.0))
    return {"flag_threshold": max(flag, 0.0) if flag >= 0 else 0.0, "match_threshold": min(match, 1.0),
            "flags_nothing": flag < 0, "matches_nothing": not fine.any()}


def report(truth_counts: np.ndarray, probs: np.ndarray, first: int, open_ended: bool, cfg: VerdictConfig,
           target_precision: float, max_wrong_passed: float, *, confidence: float = 0.9,
           before: np.ndarray | None = None) -> dict:
    """What ``verdict.json`` holds: the thresholds chosen for both rules at ``cfg``'s error rate,
    each rule's figures with them over the error rates of ``GRID`` (and ``cfg``'s), and the
    choice at a few other targets (``TARGETS``, posterior rule, chosen at each of ``RATES``). With
    ``before`` (uncalibrated probabilities), the rule of old (``thresholds`` at its fixed 0.05 / 0.5)
    on them too, as the baseline."""
    chosen: dict = {}
    for rule in ("posterior", "thresholds"):
        rule_cfg = cfg.model_copy(update={"rule": rule})
        chosen[rule] = choose(pairs(truth_counts, probs, first, open_ended, rule_cfg), target_precision,
                              max_wrong_passed, confidence)
    rows = []
    for rate in sorted({*GRID, *RATES, cfg.error_rate}):
        for rule in ("posterior", "thresholds"):
            rate_cfg = cfg.model_copy(update={"rule": rule, "error_rate": rate})
            flag, match = chosen[rule]["flag_threshold"], chosen[rule]["match_threshold"]
            found = figures(pairs(truth_counts, probs, first, open_ended, rate_cfg), flag, match)
            rows.append({"error_rate": rate, "rule": rule, "calibrated": True, "flag_threshold": flag,
                         "match_threshold": match, **found.to_dict()})
        if before is not None:
            base = cfg.model_copy(update={"rule": "thresholds", "error_rate": rate, "flag_threshold": None,
                                          "match_threshold": None})
            flag, match = base.thresholds()
            found = figures(pairs(truth_counts, before, first, open_ended, base), flag, match)
            rows.append({"error_rate": rate, "rule": BEFORE, "calibrated": False, "flag_threshold": flag,
                         "match_threshold": match, **found.to_dict()})
    choices = []
    for rate in RATES:
        rate_cfg = cfg.model_copy(update={"rule": "posterior", "error_rate": rate})
        at_rate = pairs(truth_counts, probs, first, open_ended, rate_cfg)
        for precision, passed in TARGETS:
            picked = choose(at_rate, precision, passed, confidence)
            found = figures(at_rate, picked["flag_threshold"], picked["match_threshold"])
            choices.append({"error_rate": rate, "target_flag_precision": precision, "max_wrong_passed": passed,
                            **{k: v for k, v in picked.items() if k.endswith("threshold")}, **found.to_dict()})
    return {"error_rate": cfg.error_rate, "off_by_one_share": cfg.off_by_one_share,
            "off_by_more_share": cfg.off_by_more_share,
            "target_flag_precision": target_precision, "max_wrong_passed": max_wrong_passed,
            "target_confidence": confidence, "photos": int(len(truth_counts)),
            "chosen": {rule: {k: v for k, v in c.items() if k.endswith("threshold")} for rule, c in chosen.items()},
            "meets": {rule: {"flags_nothing": c["flags_nothing"], "matches_nothing": c["matches_nothing"]}
                      for rule, c in chosen.items()},
            "figures": rows, "choices": choices,
            "table": {"header": TABLE_HEADER, "rows": table_rows({"figures": rows})}}


BEFORE = "thresholds (uncalibrated)"  # the rule of old, as the baseline rows call it


def figures_at(verdicts: dict, rule: str, error_rate: float) -> dict | None:
    """The stored figures of ``rule`` at ``error_rate``, interpolated linearly between the two
    nearest stored rates (the nearest one outside them); None when the rule has none."""
    rows = sorted((r for r in verdicts.get("figures", []) if r.get("rule") == rule), key=lambda r: r["error_rate"])
    if not rows:
        return None
    rates = [r["error_rate"] for r in rows]
    out: dict = {"rule": rule, "error_rate": error_rate, "interpolated": error_rate not in rates}
    for key in ("flag_precision", "flag_recall", "wrong_passed", "settled", "false_flags"):
        known = [(r["error_rate"], r[key]) for r in rows if r.get(key) is not None]
        out[key] = float(np.interp(error_rate, [x for x, _ in known], [y for _, y in known])) if known else None
    return out


def table_rows(verdicts: dict) -> list[list]:
    """The figures at the reported error rates (``RATES``), as the report's and the model card's table."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    return [[f"{100 * r['error_rate']:g}%", r["rule"], f"{r['flag_threshold']:.3g} / {r['match_threshold']:.3g}",
             pct(r["flag_precision"]), pct(r["flag_recall"]), pct(r["wrong_passed"]), pct(r["settled"])]
            for r in verdicts["figures"] if r["error_rate"] in RATES]


TABLE_HEADER = ["error rate", "rule", "flag / match threshold", "flag precision", "flag recall", "wrong passed",
                "settled"]
