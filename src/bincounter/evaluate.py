"""Evaluate: held-out metrics, plots, a report, and the model's latency on this machine."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bincounter import metrics as M
from bincounter.config import EVAL_METRICS, EvaluateConfig
from bincounter.data import make_loader, read_samples, ShardDataset, shard_urls
from bincounter.fileio import atomic_write
from bincounter.predictor import Predictor
from bincounter.train import resolve_device

SUMMARY_KEYS = EVAL_METRICS  # config.EvalMetric owns the names (the promotion gate accepts only these)


@dataclass
class EvaluateResult:
    out_dir: Path
    metrics: dict
    plots: list[Path]

    def summary(self) -> dict[str, float]:
        """Scalar metrics only (for KFP ``Metrics`` and MLflow)."""
        return {k: float(self.metrics[k]) for k in SUMMARY_KEYS if k in self.metrics}


def measure_speed(predictor: Predictor, jpegs: list[bytes], samples: int, batch: int = 32) -> dict[str, float]:
    """Single-image latency (decode included) and batched throughput."""
    if not jpegs or samples == 0:
        return {}
    predictor.predict_bytes(jpegs[:1])  # warm-up: first call pays for allocations
    times = []
    for i in range(samples):
        t0 = time.perf_counter()
        predictor.predict_bytes([jpegs[i % len(jpegs)]])
        times.append((time.perf_counter() - t0) * 1000)
    chunk = (jpegs * (batch // len(jpegs) + 1))[:batch]
    t0 = time.perf_counter()
    predictor.predict_bytes(chunk, batch_size=batch)
    elapsed = time.perf_counter() - t0
    times.sort()
    return {"latency_ms_p50": statistics.median(times), "latency_ms_p95": times[int(0.95 * (len(times) - 1))],
            "throughput_images_per_s": batch / elapsed, "latency_threads": float(torch.get_num_threads())}


def evaluate(cfg: EvaluateConfig, model_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
             split: str = "test") -> EvaluateResult:
    """Score the model of ``model_dir`` on one split of ``data_dir``; write metrics and plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    predictor = Predictor.from_dir(model_dir, device)
    spec = predictor.spec
    samples = read_samples(shard_urls(data_dir, split))
    if not samples:
        raise ValueError(f"{data_dir} has no '{split}' samples to evaluate on")
    dataset = ShardDataset(samples, predictor.transform)
    loader = make_loader(dataset, batch_size=cfg.batch_size, shuffle=False, workers=0, pin_memory=False)
    probs = np.concatenate([predictor.probabilities(x) for x, _ in loader])
    y = dataset.labels.numpy()
    names = list(spec.class_names) or [str(int(v)) for v in predictor.values]
    result = M.evaluate_predictions(y, probs, min_count=spec.min_count, class_names=names)
    rel = M.reliability(y, probs)
    result["ece"] = rel["ece"]
    # The reliability bins themselves, so an audit can say how often a count at a given
    # confidence was right on held-out photos (bincounter.calibration reads them back).
    result["reliability"] = {k: [None if np.isnan(v) else float(v) for v in np.asarray(rel[k], dtype=float)]
                             for k in ("edges", "accuracy", "confidence", "counts")}
    result["split"] = split
    result.update(measure_speed(predictor, [s[1] for s in samples], cfg.latency_samples))

    from bincounter import plots

    plot_dir = out_dir / "plots"
    figs = [
        plots.confusion_matrix_plot(np.array(result["confusion_matrix"]), names, plot_dir / "confusion_matrix.png"),
        plots.per_class_plot(result["per_class"], plot_dir / "per_class.png"),
        plots.reliability_plot(rel, plot_dir / "reliability.png"),
    ]
    _write_predictions(out_dir / "predictions.csv", dataset.ids, y, probs, spec.min_count)
    atomic_write(out_dir / "metrics.json", json.dumps(result, indent=2).encode())
    _write_report(out_dir, result, figs)
    return EvaluateResult(out_dir=out_dir, metrics=result, plots=figs)


def _write_predictions(path: Path, ids: list[str], y: np.ndarray, probs: np.ndarray, min_count: int) -> None:
    lines = ["id,true_label,predicted_label,confidence,expected_count"]
    values = np.arange(min_count, min_count + probs.shape[1])
    for id_, t, p in zip(ids, y, probs):
        lines.append(f"{id_},{t},{int(p.argmax())},{p.max():.4f},{float(p @ values):.3f}")
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def _write_report(out_dir: Path, m: dict, figs: list[Path]) -> None:
    from bincounter.report import html_page, markdown_table

    rows = [[k, f"{m[k]:.4f}" if isinstance(m[k], float) else m[k]] for k in SUMMARY_KEYS + ("ece", "n") if k in m]
    lines = [f"Held-out split '{m['split']}': {m['n']} photos. 'range_*' keep true counts 0-5 only "
             "(comparable with published Amazon Bin Image Dataset results: 55.7% accuracy, RMSE 0.93).",
             "", *markdown_table(["metric", "value"], rows)]
    per = [[n, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", int(v["support"])]
           for n, v in m["per_class"].items()]
    lines += ["", *markdown_table(["count", "precision", "recall", "F1", "support"], per)]
    md = ["# Evaluation", "", *lines, "", *[f"![{f.stem}](plots/{f.name})" for f in figs]]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    (out_dir / "report.html").write_text(html_page("Evaluation", lines, figs))
