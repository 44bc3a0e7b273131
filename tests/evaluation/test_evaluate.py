import csv
import json
import shutil

import numpy as np
import pytest

from bincounter.config import EVAL_METRICS, EvaluateConfig, PreprocessConfig
from bincounter.evaluation.evaluate import evaluate


def test_evaluate_writes_metrics_plots_and_report(model_dir, data_dir, tmp_path):
    result = evaluate(EvaluateConfig(latency_samples=3), model_dir, data_dir, tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    test_size = json.loads((data_dir / "dataset.json").read_text())["sizes"]["test"]
    assert m["n"] == test_size
    for key in ("accuracy", "rmse", "mae", "within_1", "macro_f1", "range_accuracy", "ece", "latency_ms_p50",
                "throughput_images_per_s"):
        assert key in m
    assert 0.0 <= m["accuracy"] <= m["within_1"] <= 1.0
    assert sum(map(sum, m["confusion_matrix"])) == test_size
    assert {p.name for p in result.plots} == {"confusion_matrix.png", "per_class.png", "reliability.png",
                                              "reliability_before_after.png", "verdict_figures.png"}
    # Calibration before and after on the test photos; the verdict thresholds chosen for the model.
    cal = m["calibration"]
    assert cal["temperature"] != 1.0 and cal["count_set_threshold"] is not None
    assert cal["nll_after"] <= cal["nll_before"] + 1e-3  # fitted on validation photos, judged on test photos
    assert 0.0 <= cal["count_set_covered"] <= 1.0 and cal["count_set_mean_size"] >= 1.0
    verdicts = json.loads((tmp_path / "verdict.json").read_text())
    assert verdicts == result.verdicts and set(verdicts["chosen"]) == {"posterior", "thresholds"}
    assert m["verdict_chosen"] == verdicts["chosen"] and verdicts["photos"] == test_size
    report = (tmp_path / "report.md").read_text()
    assert "Calibration (temperature" in report and "Verdicts: thresholds chosen" in report
    assert "| error rate | rule |" in report
    assert "Held-out split" in (tmp_path / "report.md").read_text()
    assert "data:image/png;base64" in (tmp_path / "report.html").read_text()
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert len(lines) == test_size + 1
    assert set(result.summary()) <= set(m)
    # The reliability bins travel in metrics.json, so an audit can estimate its flags' precision.
    from bincounter.evaluation.calibration import from_metrics

    assert sum(m["reliability"]["counts"]) == test_size
    cal = from_metrics(m, "metrics.json")
    assert cal.photos == test_size and 0.0 <= cal.accuracy_at(0.9) <= 1.0
    assert set(result.summary()) == set(EVAL_METRICS)  # the promotion gate accepts exactly these
    # No folder given: the test photos' originals the dataset keeps are scored as served.
    assert m["path"] == "served" and m["served_refused"] == 0 and m["shards_n"] == m["n"]
    assert "Scored as served" in (tmp_path / "report.md").read_text()


def test_a_dataset_without_originals_is_scored_on_its_shards_and_says_so(model_dir, data_dir, tmp_path):
    from bincounter.data.preprocess import ORIGINALS

    old = tmp_path / "data"  # as preprocess wrote datasets before it kept the test originals
    shutil.copytree(data_dir, old, ignore=shutil.ignore_patterns(ORIGINALS))
    result = evaluate(EvaluateConfig(latency_samples=0), model_dir, old, tmp_path / "eval")
    m = result.metrics
    assert m["path"] == "shards" and result.comparison() == {} and not any(k.startswith("shards_") for k in m)
    assert "Scored on the preprocessed shards (the dataset keeps no original photos and none were given)" \
        in (tmp_path / "eval" / "report.md").read_text()


def _rows(path):
    with open(path, newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_the_headline_is_the_served_path_and_the_shards_are_reported_beside(model_dir, data_dir, synth_dir,
                                                                            tmp_path):
    """The originals (96 px) are not the packed shards (64 px, re-encoded): the headline figures
    are what the server answers for the originals, the shard path's stay as shards_*."""
    import mlflow

    from bincounter import launch, tracking
    from bincounter.data.dataset import load_split
    from bincounter.model.predictor import Predictor
    from bincounter.serving.worker import EngineSpec, load_engine

    tracking.configure()
    with mlflow.start_run() as run:  # the training run evaluation logs into
        pass
    # fp32 only: the served answers are compared with the eager model's below (INT8 has its own test).
    out = launch.evaluate(EvaluateConfig(latency_samples=2, int8=False), str(model_dir), str(data_dir), str(tmp_path),
                          originals=[str(synth_dir)], run_id=run.info.run_id)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["path"] == out["path"] == "served" and m["served_backend"] == "onnx" and m["served_refused"] == 0

    # What the server answers, from its engine on the original bytes (eager PyTorch here; the
    # evaluation ran the ONNX export, which agrees with it to 1e-4).
    predictor = Predictor.from_dir(model_dir)
    split = load_split(data_dir, "test", predictor.transform)
    engine = load_engine(EngineSpec("torch", str(model_dir), threads=1))
    served = [o[1] for o in engine.run([(synth_dir / "bin-images" / f"{i}.jpg").read_bytes() for i in split.ids])]
    y = split.labels.numpy()
    served_label = np.array([r["count"] for r in served]) - predictor.spec.min_count
    shard_probs = np.concatenate([predictor.probabilities(split[i][0][None]) for i in range(len(split))])
    shard_label = shard_probs.argmax(1)
    assert m["n"] == m["shards_n"] == len(split)
    assert m["accuracy"] == pytest.approx((served_label == y).mean())
    assert m["shards_accuracy"] == pytest.approx((shard_label == y).mean())
    assert m["shards_differ"] == int((served_label != shard_label).sum())

    rows = _rows(tmp_path / "predictions.csv")
    assert [int(rows[i]["predicted_label"]) for i in split.ids] == served_label.tolist()
    assert [int(rows[i]["shards_predicted_label"]) for i in split.ids] == shard_label.tolist()
    served_conf = np.array([float(rows[i]["confidence"]) for i in split.ids])
    assert np.abs(served_conf - np.array([r["confidence"] for r in served])).max() < 1e-3
    # The two paths see different pixels, so the served answers are not the shards' ones.
    assert np.abs(served_conf - shard_probs.max(1)).max() > 1e-3

    # The headline is what KFP, MLflow and the promotion gate see; the comparison is logged beside.
    assert out["summary"] == {k: m[k] for k in EVAL_METRICS}
    assert {"shards_accuracy", "shards_rmse", "shards_latency_ms_p50", "shards_differ", "served_refused"} \
        <= set(out["comparison"])
    logged_run = mlflow.MlflowClient().get_run(run.info.run_id)
    assert logged_run.data.tags["evaluate.path"] == "served"
    logged = logged_run.data.metrics
    assert logged["test_accuracy"] == pytest.approx(m["accuracy"])
    assert logged["test_shards_accuracy"] == pytest.approx(m["shards_accuracy"])
    assert logged["test_shards_differ"] == m["shards_differ"] and logged["test_served_refused"] == 0
    report = (tmp_path / "report.md").read_text()
    assert "Scored as served" in report and "| metric | served (headline) | shards |" in report
    assert f"the count differs on {m['shards_differ']} of {m['n']} photos" in report


def test_originals_that_are_not_the_datasets_photos_are_a_clear_error(model_dir, data_dir, synth_dir, tmp_path):
    with pytest.raises(ValueError, match="have no original"):
        evaluate(EvaluateConfig(latency_samples=0), model_dir, data_dir, tmp_path / "a", originals=[tmp_path])
    # Other bytes under the same name: the label may not be this photo's, so nothing is scored.
    other = tmp_path / "other"
    shutil.copytree(synth_dir, other)
    test_id = next(iter(_rows_of_split(data_dir, "test")))
    (other / "bin-images" / f"{test_id}.jpg").write_bytes((synth_dir / "bin-images" / "00001.jpg").read_bytes()[:-1])
    with pytest.raises(ValueError, match=f"not the photo preprocess packed as {test_id}"):
        evaluate(EvaluateConfig(latency_samples=0), model_dir, data_dir, tmp_path / "b", originals=[other])
    assert not (tmp_path / "b" / "metrics.json").exists()


def _rows_of_split(data_dir, split):
    return [r["id"] for r in map(json.loads, (data_dir / "index.jsonl").read_text().splitlines())
            if r["split"] == split]


def test_a_photo_the_server_refuses_is_reported_not_scored(model_dir, synth_dir, tmp_path):
    """Preprocess takes photos up to its own max_pixels; the server refuses (413) more than 40
    megapixels. Such a test photo is counted and listed, and the rest is scored."""
    from PIL import Image

    from bincounter.data.preprocess import preprocess
    from bincounter.data.split import split_of

    raw = tmp_path / "raw"
    shutil.copytree(synth_dir, raw)
    cfg = PreprocessConfig(image_size=64, workers=1, max_pixels=50_000_000)
    big = next(i for i in (f"9{n:04d}" for n in range(1000)) if split_of(i, cfg) == "test")
    Image.new("L", (6400, 6400), 128).save(raw / "bin-images" / f"{big}.jpg", quality=50)
    (raw / "metadata" / f"{big}.json").write_text(json.dumps({"EXPECTED_QUANTITY": 0, "BIN_FCSKU_DATA": {}}))
    preprocess(cfg, raw, tmp_path / "data", progress=False)
    assert big in _rows_of_split(tmp_path / "data", "test")

    result = evaluate(EvaluateConfig(latency_samples=0), model_dir, tmp_path / "data", tmp_path / "eval",
                      originals=[raw])
    m = result.metrics
    assert m["served_refused"] == 1 and m["n"] == m["shards_n"] - 1
    [refusal] = m["refused"]
    assert refusal["id"] == big and refusal["status"] == 413 and "40,960,000 pixels" in refusal["detail"]
    row = _rows(tmp_path / "eval" / "predictions.csv")[big]
    assert row["predicted_label"] == "" and row["refused"].startswith("413 ") and row["shards_predicted_label"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "1 refused by the server" in report and f"| {big} | 413 |" in report
    assert sum(map(sum, m["confusion_matrix"])) == m["n"]


def test_an_evaluation_compares_with_itself(model_dir, data_dir, tmp_path):
    # bincounter.evaluation.compare reads what evaluate writes: same photos, same answers, nothing discordant.
    from bincounter.evaluation.compare import compare

    evaluate(EvaluateConfig(latency_samples=0), model_dir, data_dir, tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    c = compare([tmp_path], [tmp_path / "predictions.csv"])
    assert c.pairs[0].photos == m["n"]
    assert c.candidate_accuracy == pytest.approx(m["accuracy"]) and c.candidate_rmse == pytest.approx(m["rmse"])
    assert (c.only_candidate_right, c.only_baseline_right, c.p_value) == (0, 0, 1.0)


def test_a_split_without_kept_originals_is_scored_on_its_shards(model_dir, data_dir, tmp_path):
    # Preprocess keeps the test split's originals only: validation is scored on its shards, not refused.
    result = evaluate(EvaluateConfig(latency_samples=0), model_dir, data_dir, tmp_path, split="val")
    assert result.metrics["path"] == "shards" and result.metrics["split"] == "val"


@pytest.mark.parametrize("bound", [1.0, 0.0])
def test_int8_is_scored_beside_fp32_and_kept_only_within_its_accuracy_bound(model_dir, data_dir, synth_dir,
                                                                             tmp_path, bound):
    from bincounter.evaluation.evaluate import evaluate
    from bincounter.model.spec import INT8_ONNX_FILE

    result = evaluate(EvaluateConfig(latency_samples=2, int8_max_accuracy_drop=bound), model_dir, data_dir, tmp_path,
                      originals=[synth_dir])
    m = json.loads((tmp_path / "metrics.json").read_text())
    c = m["int8"]
    assert c["accuracy_drop"] == pytest.approx(c["accuracy_fp32"] - c["accuracy_int8"])
    assert 0.0 <= c["same_count"] <= 1.0 and c["nll_int8"] > 0 and c["ece_fp32"] >= 0
    kept = c["accuracy_drop"] <= bound
    assert c["precision"] == ("int8" if kept else "fp32")
    assert (tmp_path / INT8_ONNX_FILE).is_file() == kept  # what registration serves
    # The headline figures are those of the graph that is served.
    assert m["served_backend"] == ("onnx-int8" if kept else "onnx")
    assert m["accuracy"] == pytest.approx(c["accuracy_int8"] if kept else c["accuracy_fp32"])
    assert result.comparison()["int8_accuracy_drop"] == pytest.approx(c["accuracy_drop"])
    assert "## INT8" in (tmp_path / "report.md").read_text()
    if bound == 1.0:
        assert kept
