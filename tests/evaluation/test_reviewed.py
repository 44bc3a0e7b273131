"""Evaluation reports the photos whose label is a person's count (a review) apart from those
labelled by the inventory records (``label_source`` in index.jsonl, missing read as "metadata")."""

import csv
import json
import math
import shutil

import pytest

from bincounter.config import EvaluateConfig


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _index(data):
    return [json.loads(line) for line in (data / "index.jsonl").read_text().splitlines() if line.strip()]


def _write_index(data, rows):
    (data / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _figures(rows):
    """Photos, accuracy and RMSE of predictions.csv rows, from the file alone."""
    answered = [r for r in rows if r["predicted_label"] != ""]
    errors = [int(r["predicted_label"]) - int(r["true_label"]) for r in answered]
    return (len(answered), sum(e == 0 for e in errors) / len(answered),
            math.sqrt(sum(e * e for e in errors) / len(answered)))


def _run():
    import mlflow

    from bincounter import tracking

    tracking.configure()
    with mlflow.start_run() as run:  # the training run evaluation logs into
        pass
    return run.info.run_id


def test_reviewed_photos_are_scored_apart_from_recorded_ones(model_dir, data_dir, tmp_path):
    import mlflow

    from bincounter import launch

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    index = _index(data)
    for r in index:  # a dataset made before preprocess recorded where labels came from
        r.pop("label_source", None)
    _write_index(data, index)
    cfg = EvaluateConfig(latency_samples=0, int8=False)

    # No reviewed photo: reviewed is {"photos": 0}, recorded is the headline, and nothing else is logged.
    run_id = _run()
    out = launch.evaluate(cfg, str(model_dir), str(data), str(tmp_path / "none"), run_id=run_id)
    m = json.loads((tmp_path / "none" / "metrics.json").read_text())
    assert m["reviewed"] == {"photos": 0}
    assert m["recorded"]["photos"] == m["n"] and m["recorded"]["accuracy"] == pytest.approx(m["accuracy"])
    assert m["recorded"]["rmse"] == pytest.approx(m["rmse"])
    rows = _rows(tmp_path / "none" / "predictions.csv")
    assert {r["label_source"] for r in rows} == {"metadata"}
    assert out["reviewed"] == {"test_reviewed_photos": 0.0}
    logged = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert logged["test_reviewed_photos"] == 0
    assert "test_reviewed_accuracy" not in logged and "test_reviewed_rmse" not in logged
    report = (tmp_path / "none" / "report.md").read_text()
    assert f"Reviewed bins (people's counts): none of the {m['n']} scored 'test' photos" in report
    assert "accuracy nan" not in report.lower()

    # Mark some test photos the model got wrong and some it got right as reviewed, so that their
    # figures differ from the headline; one row loses the field (read as "metadata").
    wrong = [r["id"] for r in rows if r["predicted_label"] != r["true_label"]]
    right = [r["id"] for r in rows if r["predicted_label"] == r["true_label"]]
    assert len(wrong) >= 1 and len(right) >= 4, "the tiny model is expected to be neither perfect nor useless"
    marked = set(wrong[:3] + right[:2])
    test_ids = {r["id"] for r in index if r["split"] == "test"}
    assert marked <= test_ids
    unmarked = next(i for i in sorted(test_ids) if i not in marked)
    for r in index:
        if r["id"] in marked:
            r["label_source"] = "review"
        elif r["id"] != unmarked:
            r["label_source"] = "metadata"
    # A reviewed photo of another split does not count as a reviewed test photo.
    other = next(r for r in index if r["split"] != "test")
    other["label_source"] = "review"
    _write_index(data, index)

    run_id = _run()
    out = launch.evaluate(cfg, str(model_dir), str(data), str(tmp_path / "eval"), run_id=run_id)
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = _rows(tmp_path / "eval" / "predictions.csv")
    source = {r["id"]: r["label_source"] for r in rows}
    assert {i for i, s in source.items() if s == "review"} == marked
    assert source[unmarked] == "metadata" and other["id"] not in source

    reviewed_rows = [r for r in rows if r["id"] in marked]
    photos, accuracy, rmse = _figures(reviewed_rows)
    assert m["reviewed"]["photos"] == photos == len(marked)
    assert m["reviewed"]["accuracy"] == pytest.approx(accuracy)
    assert m["reviewed"]["rmse"] == pytest.approx(rmse)
    assert m["reviewed"]["accuracy"] == pytest.approx(len(set(right) & marked) / len(marked))
    assert 0.0 <= m["reviewed"]["within_1"] <= 1.0
    photos, accuracy, rmse = _figures([r for r in rows if r["id"] not in marked])
    assert m["recorded"]["photos"] == photos == m["n"] - len(marked)
    assert m["recorded"]["accuracy"] == pytest.approx(accuracy)
    assert m["recorded"]["rmse"] == pytest.approx(rmse)
    # The two parts make up the headline.
    assert (m["reviewed"]["accuracy"] * m["reviewed"]["photos"] + m["recorded"]["accuracy"] * m["recorded"]["photos"]
            ) == pytest.approx(m["accuracy"] * m["n"])

    assert out["reviewed"] == {"test_reviewed_photos": len(marked),
                               "test_reviewed_accuracy": pytest.approx(m["reviewed"]["accuracy"]),
                               "test_reviewed_rmse": pytest.approx(m["reviewed"]["rmse"])}
    logged = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert logged["test_reviewed_photos"] == len(marked)
    assert logged["test_reviewed_accuracy"] == pytest.approx(m["reviewed"]["accuracy"])
    assert logged["test_reviewed_rmse"] == pytest.approx(m["reviewed"]["rmse"])

    r, c = m["reviewed"], m["recorded"]
    for name in ("report.md", "report.html"):
        report = (tmp_path / "eval" / name).read_text()
        assert "Reviewed bins (people" in report
        assert f"{r['photos']} test photos, accuracy {r['accuracy']:.1%}, RMSE {r['rmse']:.3f}" in report
        assert f"{c['photos']} test photos, accuracy {c['accuracy']:.1%}, RMSE {c['rmse']:.3f}" in report
    assert "| reviewed (people's counts) | 5 |" in (tmp_path / "eval" / "report.md").read_text()


def test_label_sources_read_a_missing_field_or_index_as_metadata():
    from bincounter.evaluation.evaluate import label_sources

    index = {"a": {"id": "a", "label_source": "review"}, "b": {"id": "b"}, "c": {"id": "c", "label_source": "metadata"}}
    assert label_sources(index, ["a", "b", "c", "d"]) == ["review", "metadata", "metadata", "metadata"]
    assert label_sources(None, ["a"]) == ["metadata"]
