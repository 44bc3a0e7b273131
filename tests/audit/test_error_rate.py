"""The inventory's error rate from bins people counted: the estimate, its interval, how wrong the
wrong records are, and hostile rows that are skipped and said, never guessed."""

from __future__ import annotations

import json

import pytest

from bincounter.audit.error_rate import estimate, jeffreys_interval
from bincounter.config import ErrorRateConfig


def test_the_estimate_and_its_interval(tmp_path):
    rows = ["id,expected,counted"]
    rows += [f"a{i},3,3" for i in range(180)]
    rows += [f"b{i},3,4" for i in range(12)] + [f"c{i},2,0" for i in range(4)] + [f"d{i},1,5" for i in range(4)]
    path = tmp_path / "reviewed.csv"
    path.write_text("\n".join(rows) + "\n")
    found = estimate(path)
    assert (found.reviewed, found.wrong, found.skipped) == (200, 20, 0)
    assert found.error_rate == pytest.approx(0.1)
    assert found.low < 0.1 < found.high and found.high - found.low < 0.1
    assert found.off_by_one_share == pytest.approx(12 / 20) and found.off_by_more_share == pytest.approx(4 / 20)


def test_the_jeffreys_interval_at_the_ends():
    assert jeffreys_interval(0, 50, 0.95)[0] == 0.0 and 0.0 < jeffreys_interval(0, 50, 0.95)[1] < 0.06
    assert jeffreys_interval(50, 50, 0.95)[1] == 1.0


def test_hostile_rows_are_skipped_and_said(tmp_path):
    path = tmp_path / "reviewed.csv"
    path.write_bytes(b"\xef\xbb\xbfid,expected,counted,note\n"
                     b"ok1,2,2,fine\n"
                     b"ok1,2,3,listed twice\n"
                     b",2,2,no id\n"
                     b"x1,-1,2,negative\n"
                     b"x2,2,99999,too many\n"
                     b"x3,two,2,not a number\n"
                     b"x4,2\n"
                     b"x5,1,1," + b"z" * 200 + b"\n"
                     b"\n"
                     b"ok2,4,3,fine\n")
    found = estimate(path, ErrorRateConfig(max_line_bytes=100))
    assert (found.reviewed, found.wrong) == (2, 1)
    assert found.skipped == 7
    reasons = " ".join(found.skipped_examples)
    assert "listed twice" in reasons and "no id" in reasons and "outside 0..1000" in reasons
    assert "longer than 100 bytes" in reasons


def test_a_file_that_is_not_a_review_is_refused(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("id,expected\n1,2\n")
    with pytest.raises(ValueError, match="no header id,expected,counted"):
        estimate(path)


def test_the_command_suggests_settings(tmp_path, capsys):
    from bincounter.cli import main

    path = tmp_path / "reviewed.csv"
    path.write_text("id,expected,counted\n" + "".join(f"{i},1,{1 if i % 10 else 2}\n" for i in range(100)))
    main(["error-rate", str(path)])
    out = json.loads(capsys.readouterr().out)
    assert out["error_rate"] == pytest.approx(0.1) and "--verdict.error-rate 0.1" in out["suggested"]
    assert "--verdict.off-by-one-share 1.00" in out["suggested"]
