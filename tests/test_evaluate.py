import json

from bincounter.config import EvaluateConfig
from bincounter.evaluate import evaluate


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
    assert {p.name for p in result.plots} == {"confusion_matrix.png", "per_class.png", "reliability.png"}
    assert "Held-out split" in (tmp_path / "report.md").read_text()
    assert "data:image/png;base64" in (tmp_path / "report.html").read_text()
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert len(lines) == test_size + 1
    assert set(result.summary()) <= set(m)
    # The reliability bins travel in metrics.json, so an audit can estimate its flags' precision.
    from bincounter.calibration import from_metrics

    assert sum(m["reliability"]["counts"]) == test_size
    cal = from_metrics(m, "metrics.json")
    assert cal.photos == test_size and 0.0 <= cal.accuracy_at(0.9) <= 1.0
    from bincounter.config import EVAL_METRICS

    assert set(result.summary()) == set(EVAL_METRICS)  # the promotion gate accepts exactly these
