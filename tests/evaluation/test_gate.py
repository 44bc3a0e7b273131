"""The promotion gate decides on the same photos, on a real gain, without regressions, and refuses
to compare models whose answers mean different things."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bincounter.config import RegisterConfig
from bincounter.evaluation.gate import decide, evidence, paired_judge, score_pair

SIX = [str(c) for c in range(6)]
SPEC = {"class_names": SIX, "min_count": 0}


def predictions(path: Path, truth: list[int], predicted: list[int | None]) -> Path:
    """An evaluation's predictions.csv (true and predicted class per photo; None: refused)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "true_label", "predicted_label", "confidence", "expected_count"])
        for i, (t, p) in enumerate(zip(truth, predicted)):
            writer.writerow([f"{i:05d}", t, "" if p is None else p, "", ""])
    return path


def truth(n: int = 480) -> list[int]:
    return [i % 6 for i in range(n)]


def right_on(labels: list[int], photos: set[int]) -> list[int]:
    """Right on ``photos``, one count too high elsewhere."""
    return [t if i in photos else (t + 1) % 6 for i, t in enumerate(labels)]


def test_a_gain_chance_explains_is_not_promoted(tmp_path):
    """The old gate promoted a 0.1-point gain as surely as a 10-point one."""
    labels = truth()
    champion = predictions(tmp_path / "b.csv", labels, right_on(labels, set(range(0, 480, 2))))  # 50%
    challenger = predictions(tmp_path / "a.csv", labels, right_on(labels, set(range(0, 480, 2)) | {1, 3, 5}))
    paired = score_pair(challenger, champion, SIX, 0)
    assert paired.challenger["accuracy"] - paired.champion["accuracy"] == pytest.approx(3 / 480)
    promoted, reason = decide(RegisterConfig(), paired)
    assert not promoted and "McNemar p = 0.25" in reason
    assert decide(RegisterConfig(max_p_value=1.0), paired)[0]  # with no significance asked it would pass


def test_a_real_gain_on_the_same_photos_is_promoted_with_its_evidence(tmp_path):
    labels = truth()
    champion = predictions(tmp_path / "b.csv", labels, right_on(labels, set(range(0, 480, 2))))
    challenger = predictions(tmp_path / "a.csv", labels, right_on(labels, set(range(0, 480, 2)) | set(range(1, 200, 2))))
    paired = score_pair(challenger, champion, SIX, 0)
    promoted, reason = decide(RegisterConfig(), paired)
    assert promoted and reason.startswith("promoted: accuracy 0.7083 against the champion's 0.5000 on the same 480")
    tags = evidence(paired)
    assert tags["gate.photos"] == "480" and tags["gate.only_challenger_right"] == "100"
    assert tags["gate.champion.accuracy"] == "0.5" and float(tags["gate.p_value"]) < 1e-20
    assert len(tags["gate.photos_sha256"]) == 64
    # The digest names the photos and their counts: another test split, another digest.
    other = score_pair(predictions(tmp_path / "c.csv", labels[:-6], right_on(labels[:-6], set())),
                       predictions(tmp_path / "d.csv", labels[:-6], right_on(labels[:-6], set())), SIX, 0)
    assert other.photos_sha256 != paired.photos_sha256


def test_a_class_that_gets_worse_past_the_margin_keeps_the_champion(tmp_path):
    labels = truth()
    champion = predictions(tmp_path / "b.csv", labels, right_on(labels, set(range(480))))  # all right
    # Better elsewhere is impossible here, so: right everywhere but on class 3, which it misses.
    challenger = predictions(tmp_path / "a.csv", labels, right_on(labels, {i for i in range(480) if i % 6 != 3}))
    paired = score_pair(challenger, champion, SIX, 0)
    promoted, reason = decide(RegisterConfig(min_improvement=0.0, max_p_value=1.0, max_class_drop=0.1), paired)
    assert not promoted and "class 3's recall drops from 1.000 to 0.000 on 80 photos" in reason


def test_the_rmse_may_not_rise_past_its_margin(tmp_path):
    labels = truth()
    champion = predictions(tmp_path / "b.csv", labels, right_on(labels, set(range(0, 480, 2))))
    # More exact answers, but the misses are far off: 0 <-> 5.
    better_but_wild = [t if i % 2 == 0 or i % 3 == 0 else 5 - t for i, t in enumerate(labels)]
    paired = score_pair(predictions(tmp_path / "a.csv", labels, better_but_wild), champion, SIX, 0)
    assert paired.challenger["accuracy"] > paired.champion["accuracy"]
    promoted, reason = decide(RegisterConfig(max_p_value=1.0, max_class_drop=1.0), paired)
    assert not promoted and "RMSE rises by" in reason


def test_models_with_other_label_definitions_are_refused_not_compared(tmp_path):
    """A challenger preprocessed with --preprocess.max-count 1 answers over two classes: its
    'accuracy' beats any 0-5 champion's and means something else."""
    labels = [i % 2 for i in range(480)]
    challenger = predictions(tmp_path / "a.csv", labels, labels)  # 100% on the 0/1 question
    judge = paired_judge(RegisterConfig(), {"class_names": ["0", "1"], "min_count": 0}, challenger,
                         lambda version: (SPEC, tmp_path / "never-read.csv"))
    verdict = judge("4")
    assert not verdict.promote and verdict.reason.startswith("refused: the challenger answers over classes ['0', '1']")
    assert verdict.evidence == {"gate.champion_version": "4"}
    overflow = paired_judge(RegisterConfig(), {"class_names": [*SIX, "6+"], "min_count": 0}, challenger,
                            lambda version: (SPEC, tmp_path / "never-read.csv"))
    assert overflow("4").reason.startswith("refused:")


def test_photos_or_counts_that_differ_are_not_compared(tmp_path):
    labels = truth()
    a = predictions(tmp_path / "a.csv", labels, labels)
    with pytest.raises(ValueError, match="did not score the same photos"):
        score_pair(a, predictions(tmp_path / "b.csv", labels[:-1], labels[:-1]), SIX, 0)
    with pytest.raises(ValueError, match="did not score the same photos"):
        score_pair(a, predictions(tmp_path / "c.csv", [(t + 1) % 6 for t in labels], labels), SIX, 0)


def test_photos_either_server_refused_are_left_out_and_counted(tmp_path):
    labels = truth(60)
    answers = list(labels)
    answers[7] = None
    paired = score_pair(predictions(tmp_path / "a.csv", labels, answers), predictions(tmp_path / "b.csv", labels,
                                                                                      labels), SIX, 0)
    assert (paired.photos, paired.left_out) == (59, 1)


def test_the_champion_is_scored_once_per_version_and_the_first_model_is_promoted(tmp_path):
    labels = truth()
    challenger = predictions(tmp_path / "a.csv", labels, labels)
    calls = []

    def score(version):
        calls.append(version)
        return SPEC, predictions(tmp_path / f"v{version}.csv", labels, right_on(labels, set()))

    judge = paired_judge(RegisterConfig(), SPEC, challenger, score)
    assert judge(None).promote and calls == []
    assert judge("2").promote and judge("2").promote and calls == ["2"]
