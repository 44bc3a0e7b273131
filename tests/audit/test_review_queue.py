"""The review queue: of an audit's unsure and flagged bins, the ones the model is least sure of
first, up to the budget; hostile rows skipped and counted; no counts in it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from bincounter.audit import review_queue as rq
from bincounter.config import ReviewQueueConfig

HEADER = "id,expected,predicted,probability_of_expected,probability_record_right,confidence,verdict\n"


def audit(tmp_path, rows: list[str]) -> object:
    folder = tmp_path / "audit"
    folder.mkdir()
    (folder / "audit.csv").write_text(HEADER + "".join(r + "\n" for r in rows))
    return folder


def test_least_sure_first_within_the_budget_and_only_the_verdicts_asked_for(tmp_path):
    folder = audit(tmp_path, [
        "00001,3,3,0.9,0.99,0.90,match",
        "00002,2,4,0.01,0.02,0.40,mismatch",
        "00003,1,2,0.3,0.6,0.35,unsure",
        "00004,5,5,0.5,0.9,0.55,unsure",
        "00005,0,1,0.2,0.5,0.35,unsure",  # ties 00003: the smaller id first
        "00006,4,4,0.7,0.97,0.20,match",  # the least sure of all, but passed: nobody looks at it
    ])
    queue = rq.build(folder, ReviewQueueConfig(budget=3))
    assert [id_ for id_, _ in queue.entries] == ["00003", "00005", "00002"]
    assert queue.entries[0][1] == pytest.approx(0.65) and queue.candidates == 4 and queue.skipped == 0
    everything = rq.build(folder, ReviewQueueConfig(budget=10, verdicts=("unsure", "mismatch", "match")))
    assert everything.entries[0][0] == "00006" and len(everything.entries) == 6
    out = rq.write(queue, tmp_path / "queue.csv")
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == ["00003", "00005", "00002"] and rows[0]["position"] == "1"
    # Ids and order only: nothing a person counting could anchor on.
    assert set(rows[0]) == {"position", "id", "uncertainty", "model"} and rows[0]["model"] == ""


def test_hostile_rows_are_skipped_and_counted_never_queued(tmp_path):
    folder = audit(tmp_path, [
        "00001,3,3,0.9,0.99,0.30,unsure",
        "00001,3,3,0.9,0.99,0.10,unsure",  # listed twice
        "../../etc/passwd,1,1,0.5,0.5,0.1,unsure",  # not a dataset id
        "00003,1,1,0.5,0.5,nan,unsure",
        "00004,1,1,0.5,0.5,1.5,unsure",
        "00005,1,1",  # short
        "00006,1,1,0.5,0.5," + "9" * 70_000 + ",unsure",  # over the line limit: never held
        "00007,1,1,0.5,0.5,0.2,unsure",
    ])
    queue = rq.build(folder, ReviewQueueConfig())
    assert [id_ for id_, _ in queue.entries] == ["00007", "00001"]
    assert queue.skipped == 6 and any("twice" in s for s in queue.skipped_examples)
    assert any("longer than" in s for s in queue.skipped_examples)


def test_a_file_that_is_not_an_audit_is_refused(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("id,expected,counted\n00001,1,1\n")
    with pytest.raises(ValueError, match="not an audit's CSV"):
        rq.build(other)


def test_the_command_writes_the_queue(tmp_path):
    folder = audit(tmp_path, ["00002,2,4,0.01,0.02,0.40,mismatch", "00003,1,2,0.3,0.6,0.35,unsure"])
    proc = subprocess.run([sys.executable, "-m", "bincounter.cli", "review-queue", str(folder), "--out",
                           str(tmp_path / "q.csv"), "--budget", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    said = json.loads(proc.stdout)
    assert said["bins"] == 1 and said["candidates"] == 2
    assert (tmp_path / "q.csv").read_text().splitlines()[1].startswith("1,00003,")


def test_earlier_answers_take_settled_bins_out_and_put_disputes_first(tmp_path):
    from bincounter.config import SourceConfig
    from bincounter.data.reviews import Answer, FolderReviews

    folder = audit(tmp_path, [
        "00001,3,3,0.9,0.99,0.30,unsure",
        "00002,2,4,0.01,0.02,0.40,mismatch",
        "00003,1,2,0.3,0.6,0.35,unsure",
        "00004,5,5,0.5,0.9,0.55,unsure",
    ])
    floor = FolderReviews(tmp_path / "floor")
    sha = "a" * 64
    floor.append("00001", Answer.new("ana", 3, sha))  # settled: nobody counts it again
    floor.append("00004", Answer.new("ana", 5, sha))
    floor.append("00004", Answer.new("bo", 4, sha))  # disputed: first, for a third person
    floor.append("00009", Answer.new("ana", 1, sha))
    floor.append("00009", Answer.new("bo", 2, sha))  # disputed yesterday, not in today's audit
    floor.append("00003", Answer.new("ana", None, sha))
    floor.append("00003", Answer.new("bo", None, sha))  # two people could not count it
    cfg = ReviewQueueConfig(reviews=SourceConfig(uri=str(tmp_path / "floor"), anonymous=False))
    queue = rq.build(folder, cfg)
    assert [id_ for id_, _ in queue.entries] == ["00004", "00009", "00002"]
    assert queue.entries[0][1] == pytest.approx(0.45)
    rows = list(csv.DictReader(rq.write(queue, tmp_path / "queue.csv").open()))
    assert rows[1]["id"] == "00009" and rows[1]["uncertainty"] == "nan"
    assert [b.id for b in rq.read(tmp_path / "queue.csv")[0]] == ["00004", "00009", "00002"]
    # Two agreeing answers asked for: ana's lone 3 no longer settles 00001.
    assert "00001" in [id_ for id_, _ in rq.build(folder, cfg.model_copy(update={"agreeing": 2})).entries]
