"""bincounter.evaluation.compare: paired accuracy, RMSE and McNemar's exact test between two evaluations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bincounter import cli
from bincounter.evaluation.compare import compare, compare_pair, mcnemar_p


def write_predictions(folder: Path, truth: list[int], predicted: list[int | None]) -> Path:
    folder.mkdir(parents=True)
    with (folder / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "true_label", "predicted_label", "confidence", "expected_count", "shards_predicted_label"])
        for i, (t, p) in enumerate(zip(truth, predicted)):
            w.writerow([f"{i:05d}", t, "" if p is None else p, "" if p is None else "0.5", "", t])
    return folder


def test_mcnemar_exact_p_values() -> None:
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64)  # six discordant photos, all one way
    assert mcnemar_p(6, 0) == mcnemar_p(0, 6)
    assert mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)
    # docs/accuracy.md's comparisons: 67 against 65 (p = 0.93), 175 against 148 (p = 0.15).
    assert mcnemar_p(67, 65) == pytest.approx(0.93, abs=0.005)
    assert mcnemar_p(175, 148) == pytest.approx(0.15, abs=0.005)


def test_a_pair_counts_the_photos_only_one_model_got_right(tmp_path: Path) -> None:
    truth = [0, 1, 2, 3, 4, 5, 2, 2]
    cand = write_predictions(tmp_path / "a", truth, [0, 1, 2, 3, 4, 4, 1, 2])  # 6 right
    base = write_predictions(tmp_path / "b", truth, [0, 1, 3, 0, 4, 5, 2, 2])  # 6 right
    r = compare_pair(cand, base)
    assert (r.photos, r.left_out) == (8, 0)
    assert (r.only_candidate_right, r.only_baseline_right) == (2, 2)
    assert r.candidate_accuracy == r.baseline_accuracy == 0.75
    assert r.candidate_rmse == pytest.approx((2 / 8) ** 0.5)
    assert r.baseline_rmse == pytest.approx((10 / 8) ** 0.5)
    assert r.p_value == 1.0


def test_refused_photos_are_left_out_of_the_pair(tmp_path: Path) -> None:
    truth = [1, 1, 1, 1]
    cand = write_predictions(tmp_path / "a", truth, [1, None, 1, 1])
    base = write_predictions(tmp_path / "b", truth, [0, 0, 0, 1])
    r = compare_pair(cand / "predictions.csv", base)
    assert (r.photos, r.left_out, r.only_candidate_right, r.only_baseline_right) == (3, 1, 2, 0)


def test_seeds_pool_their_discordant_photos(tmp_path: Path) -> None:
    truth = [0] * 10
    a0 = write_predictions(tmp_path / "a0", truth, [0] * 6 + [1] * 4)
    b0 = write_predictions(tmp_path / "b0", truth, [1] * 10)
    a1 = write_predictions(tmp_path / "a1", truth, [0] * 4 + [1] * 6)
    b1 = write_predictions(tmp_path / "b1", truth, [1] * 10)
    c = compare([a0, a1], [b0, b1])
    assert (c.only_candidate_right, c.only_baseline_right) == (10, 0)
    assert c.p_value == pytest.approx(2 / 1024)
    assert c.candidate_accuracy == pytest.approx(0.5) and c.baseline_accuracy == 0.0
    assert [p.p_value for p in c.pairs] == [pytest.approx(2 / 64), pytest.approx(2 / 16)]


@pytest.mark.parametrize("case, message", [
    ("other_photos", "scored different photos"),
    ("other_truth", "disagree on the true count"),
    ("unpaired", "as many baseline evaluations"),
    ("not_predictions", "no column"),
    ("garbage_label", "unreadable label"),
    ("duplicate", "appears twice"),
    ("missing", "no predictions.csv"),
])
def test_mismatched_or_bad_inputs_are_refused_with_the_reason(tmp_path: Path, case: str, message: str) -> None:
    a = write_predictions(tmp_path / "a", [1, 2, 3], [1, 2, 3])
    b = tmp_path / "b"
    if case == "other_photos":
        write_predictions(b, [1, 2, 3, 4], [1, 2, 3, 4])
    elif case == "other_truth":
        write_predictions(b, [1, 2, 4], [1, 2, 3])
    elif case == "unpaired":
        with pytest.raises(ValueError, match=message):
            compare([a, a], [a])
        return
    elif case == "not_predictions":
        b.mkdir()
        (b / "predictions.csv").write_text("name,count\nx,1\n")
    elif case == "garbage_label":
        b.mkdir()
        (b / "predictions.csv").write_text("id,true_label,predicted_label\n00000,1,one\n")
    elif case == "duplicate":
        b.mkdir()
        (b / "predictions.csv").write_text("id,true_label,predicted_label\n00000,1,1\n00000,1,1\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        compare([a], [b])


def test_the_command_prints_the_comparison(tmp_path: Path, capsys) -> None:
    a = write_predictions(tmp_path / "a", [1, 2, 3], [1, 2, 3])
    b = write_predictions(tmp_path / "b", [1, 2, 3], [1, 0, 0])
    cli.main(["compare", "--candidate", str(a), "--baseline", str(b)])
    out = json.loads(capsys.readouterr().out)
    assert (out["only_candidate_right"], out["only_baseline_right"]) == (2, 0)
    assert out["candidate_accuracy"] == 1.0 and out["p_value"] == 0.5
