"""Evaluate: held-out metrics, plots, a report, and the model's latency on this machine.

The headline figures score what is served: each test photo's original bytes (from the
ingest output) go through the model server's own code, ``serving.loading.engine_spec`` and
``serve_worker.load_engine`` (its header-checked decoder, the evaluation transform, and
the ``model.onnx`` exported as registration exports it). The pre-resized shards training
reads are scored too, as ``shards_*``, with the number of photos whose count differs
between the two paths. Without the originals (older runs, unit tests) the shards are the
only path scored, and the report says so.

Each test photo's label is either a person's count from a review on the warehouse floor or the
inventory record's (``label_source`` in ``index.jsonl``: "review" or "metadata", missing read as
"metadata"). The headline figures are restricted to each kind too, as ``reviewed`` and
``recorded`` (metrics.json, the report, ``label_source`` in predictions.csv): a reviewed bin's
label is what a person counted in it, a recorded one's what the inventory expected it to hold.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bincounter.evaluation import metrics as M
from bincounter.config import EVAL_METRICS, EvaluateConfig
from bincounter.data.dataset import make_loader, read_samples, ShardDataset, shard_urls
from bincounter.fileio import atomic_write
from bincounter.ids import is_file_stem
from bincounter.model.calibration import VERDICT_FILE, nll
from bincounter.model.calibration import probabilities as calibrated_probabilities
from bincounter.model.predictor import Predictor
from bincounter.model.spec import INT8_ONNX_FILE
from bincounter.data.preprocess import ORIGINALS, ORIGINALS_OF
from bincounter.data.reviews import FROM_METADATA, FROM_REVIEW, LABEL_SOURCE
from bincounter.data.sources import IMAGES
from bincounter.model.device import resolve_device

SUMMARY_KEYS = EVAL_METRICS  # config.EvalMetric owns the names (the promotion gate accepts only these)
SERVED, SHARDS = "served", "shards"  # metrics["path"]: what the headline figures scored
SHARDS_PREFIX = "shards_"  # the shard path's figures, beside the served headline
_COMPARED = SUMMARY_KEYS + ("ece", "n")
_LISTED_REFUSALS = 20  # in the report; metrics.json lists them all
_TIMED = 32  # photos timed for latency and throughput (one batch of measure_speed)
REVIEWED, RECORDED = "reviewed", "recorded"  # metrics.json: the figures on each kind of label
_BY_SOURCE = ("accuracy", "rmse", "mae", "within_1")  # the figures given per kind of label


@dataclass
class EvaluateResult:
    out_dir: Path
    metrics: dict
    plots: list[Path]
    verdicts: dict  # verdict.json: the thresholds chosen for the model and what they do (evaluation.verdicts)

    def summary(self) -> dict[str, float]:
        """The headline scalars (for KFP ``Metrics``, MLflow and the promotion gate)."""
        return {k: float(self.metrics[k]) for k in SUMMARY_KEYS if k in self.metrics}

    def comparison(self) -> dict[str, float]:
        """Beside a served headline: the shard path's figures (``shards_*``), the photos whose
        count differs between the paths (``shards_differ``) and the photos the server refused
        (``served_refused``). Empty when only the shards were scored."""
        figures = {k: float(v) for k, v in self.metrics.items()
                   if (k.startswith(SHARDS_PREFIX) or k == "served_refused") and isinstance(v, (int, float))}
        # INT8 against fp32 on the same photos (int8_accuracy_fp32, int8_accuracy_int8, int8_accuracy_drop...).
        figures.update({f"int8_{k}": float(v) for k, v in self.metrics.get("int8", {}).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return figures


def measure_speed(run: Callable[[list[bytes]], object], images: list[bytes], samples: int,
                  batch: int = _TIMED) -> dict[str, float]:
    """Single-image latency (decode included) and batched throughput of ``run`` (a callable
    taking a list of image bytes)."""
    if not images or samples == 0:
        return {}
    run(images[:1])  # warm-up: first call pays for allocations
    times = []
    for i in range(samples):
        t0 = time.perf_counter()
        run([images[i % len(images)]])
        times.append((time.perf_counter() - t0) * 1000)
    chunk = (images * (batch // len(images) + 1))[:batch]
    t0 = time.perf_counter()
    run(chunk)
    elapsed = time.perf_counter() - t0
    times.sort()
    # Nearest rank: the smallest time at least 95% of the calls took no longer than.
    p95 = times[min(len(times), math.ceil(0.95 * len(times))) - 1]
    return {"latency_ms_p50": statistics.median(times), "latency_ms_p95": p95,
            "throughput_images_per_s": batch / elapsed, "latency_threads": float(torch.get_num_threads())}


def index_rows(data_dir: str | Path) -> dict[str, dict] | None:
    """The dataset's ``index.jsonl`` (written by preprocess) by sample id; None when it has none."""
    index_path = Path(data_dir) / "index.jsonl"
    if not index_path.is_file():
        return None
    return {r["id"]: r for r in map(json.loads, filter(str.strip, index_path.read_text().splitlines()))}


def label_sources(index: dict[str, dict] | None, ids: Sequence[str]) -> list[str]:
    """Where each id's label came from: "review" (a person's count) or "metadata" (the
    inventory record's, also for a dataset made before preprocess recorded it)."""
    rows = index or {}
    return [rows.get(id_, {}).get(LABEL_SOURCE) or FROM_METADATA for id_ in ids]


def by_label_source(y: np.ndarray, probs: np.ndarray, sources: Sequence[str], min_count: int,
                    names: list[str]) -> dict[str, dict]:
    """The headline figures (``M.evaluate_predictions``) on the answered photos whose label is a
    person's count (``reviewed``) and on the others (``recorded``); ``{"photos": 0}`` for a kind
    with no photo. ``y``, ``probs`` and ``sources``: one entry per answered photo."""
    reviewed = np.array([s == FROM_REVIEW for s in sources], dtype=bool)
    out = {}
    for key, mask in ((REVIEWED, reviewed), (RECORDED, ~reviewed)):
        if not mask.any():
            out[key] = {"photos": 0}
            continue
        f = M.evaluate_predictions(y[mask], probs[mask], min_count=min_count, class_names=names)
        out[key] = {"photos": int(f["n"]), **{k: f[k] for k in _BY_SOURCE if k in f}}
    return out


def original_paths(data_dir: str | Path, ids: list[str], folders: Sequence[str | Path], *,
                   index: dict[str, dict] | None = None) -> list[tuple[Path, str]]:
    """Where each id's original photo is (``bin-images/<id>.jpg`` in one of the ingest output
    ``folders``) and the sha256 preprocess recorded for it (``index.jsonl``).

    Raises ValueError when a photo is missing: the folders are not the ingest output(s) this
    dataset was made from, and scoring a part of the split would not be the test split.
    ``index``: ``index_rows(data_dir)`` when already read.
    """
    index = index if index is not None else index_rows(data_dir)
    if index is None:
        raise ValueError(f"{data_dir} has no index.jsonl: the originals cannot be matched to the test photos")
    sha = {id_: r.get("sha256") for id_, r in index.items()}
    roots = [Path(f) for f in folders]
    out, missing = [], []
    for id_ in ids:
        if not is_file_stem(id_):  # as preprocess checks it: a shard key never names a path elsewhere
            raise ValueError(f"test sample key {id_!r} is not a file name")
        path = next((p for p in (r / IMAGES / f"{id_}.jpg" for r in roots) if p.is_file()), None)
        if path is None or not sha.get(id_):
            missing.append(id_)
        else:
            out.append((path, sha[id_]))
    if missing:
        raise ValueError(f"{len(missing)} of {len(ids)} test photos have no original (or no recorded sha256) in "
                         f"{', '.join(map(str, roots))} (first: {', '.join(missing[:3])}): give the ingest "
                         "output(s) this dataset was made from")
    return out


def _read_original(path: Path, sha256: str, id_: str) -> bytes:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        # Other bytes than preprocess labelled: the label may not be this photo's.
        raise ValueError(f"{path} is not the photo preprocess packed as {id_} (its sha256 differs): give the "
                         "ingest output(s) this dataset was made from")
    return data


@dataclass
class ServedScores:
    probabilities: list[list[float] | None]  # per photo; None where the server refused it
    refused: list[dict]  # {"id", "status", "detail"}: what the server would answer instead
    speed: dict[str, float]
    backend: str


def score_as_served(model_dir: str | Path, ids: list[str], originals: list[tuple[Path, str]], *,
                    batch_size: int, latency_samples: int, int8_batches: list[np.ndarray] | None = None,
                    int8_out: Path | None = None) -> tuple[ServedScores, ServedScores | None]:
    """Run the original photos through the model server's own engine: fp32, and with
    ``int8_batches`` (calibration photos) the INT8 graph quantized from it too, written to ``int8_out``.

    The engine is the one ``bincounter serve`` starts for the registered model: the same
    files (``onnx_export.serving_files``, as registration logs them), the same choice of
    backend and limits (``serving.loading.engine_spec`` with ``ServeConfig``'s defaults), the same
    decode-transform-infer code (``serve_worker.NativeEngine``). Only the thread count is this
    machine's: it changes the speed, not the answers.
    """
    from bincounter.config import ServeConfig
    from bincounter.model.onnx_export import serving_files
    from bincounter.model.quantize import quantize_int8
    from bincounter.model.spec import ONNX_FILE
    from bincounter.serving.loading import engine_spec
    from bincounter.serving.worker import load_engine

    def scores(precision: str, folder: Path) -> ServedScores:
        cfg = ServeConfig(threads_per_worker=torch.get_num_threads(), precision=precision)
        engine = load_engine(engine_spec(cfg, folder, folder))
        probs: list[list[float] | None] = [None] * len(ids)
        refused: list[dict] = []
        timed: list[bytes] = []  # a few answered originals for the latency figures
        for start in range(0, len(ids), batch_size):
            chunk = [_read_original(path, sha, ids[i])
                     for i, (path, sha) in enumerate(originals[start:start + batch_size], start)]
            for i, outcome in enumerate(engine.run(chunk), start):
                if outcome[0] == "ok":
                    probs[i] = outcome[1]["probabilities"]
                    if len(timed) < _TIMED:
                        timed.append(chunk[i - start])
                else:
                    refused.append({"id": ids[i], "status": int(outcome[1]), "detail": str(outcome[2])})
        return ServedScores(probs, refused, measure_speed(engine.run, timed, latency_samples), engine.info.backend)

    with serving_files(model_dir) as folder:
        fp32 = scores("fp32", folder)
        if int8_batches is None:
            return fp32, None
        quantize_int8(folder / ONNX_FILE, int8_batches, folder / INT8_ONNX_FILE)
        int8 = scores("int8", folder)
        if int8_out is not None:
            atomic_write(int8_out, (folder / INT8_ONNX_FILE).read_bytes())
    return fp32, int8


def int8_calibration(data_dir: str | Path, spec, photos: int, batch: int = 16) -> list[np.ndarray]:
    """Photos the model did not learn from (validation, else training: only activation ranges are
    taken from them), transformed as the server transforms them, in batches."""
    from bincounter.model.images import EvalArrays, decode_rgb

    samples = read_samples(shard_urls(data_dir, "val")) or read_samples(shard_urls(data_dir, "train"))
    transform = EvalArrays(size=spec.image_size, mean=spec.mean, std=spec.std)
    arrays = [transform(decode_rgb(jpg)) for _, jpg, _ in samples[:photos]]
    return [np.stack(arrays[i:i + batch]) for i in range(0, len(arrays), batch)]


def choose_precision(fp32: ServedScores, int8: ServedScores, y: np.ndarray, spec, names: list[str],
                     max_drop: float) -> tuple[ServedScores, dict]:
    """INT8 when it answers the photos both answer within ``max_drop`` of fp32's accuracy;
    the figures of both, side by side."""
    both = [i for i, (a, b) in enumerate(zip(fp32.probabilities, int8.probabilities)) if a is not None and b is not None]
    figures = {}
    for name, scored in (("fp32", fp32), ("int8", int8)):
        probs = np.array([scored.probabilities[i] for i in both], dtype=np.float64)
        f = _figures(y[both], probs, spec.min_count, names)
        figures[name] = {"accuracy": f["accuracy"], "ece": f["ece"], "nll": nll(probs, y[both]),
                         "throughput_images_per_s": scored.speed.get("throughput_images_per_s"),
                         "latency_ms_p50": scored.speed.get("latency_ms_p50")}
    drop = figures["fp32"]["accuracy"] - figures["int8"]["accuracy"]
    kept = drop <= max_drop
    agree = float(np.mean([np.argmax(fp32.probabilities[i]) == np.argmax(int8.probabilities[i]) for i in both]))
    comparison = {"precision": "int8" if kept else "fp32", "accuracy_drop": drop, "max_accuracy_drop": max_drop,
                  "same_count": agree, **{f"{k}_{name}": v for name, f in figures.items() for k, v in f.items()}}
    return (int8 if kept else fp32), comparison


def _figures(y: np.ndarray, probs: np.ndarray, min_count: int, names: list[str]) -> dict:
    result = M.evaluate_predictions(y, probs, min_count=min_count, class_names=names)
    rel = M.reliability(y, probs)
    result["ece"] = rel["ece"]
    # The reliability bins themselves, so an audit can say how often a count at a given
    # confidence was right on held-out photos (bincounter.evaluation.calibration reads them back).
    result["reliability"] = {k: [None if np.isnan(v) else float(v) for v in np.asarray(rel[k], dtype=float)]
                             for k in ("edges", "accuracy", "confidence", "counts")}
    return result


def evaluate(cfg: EvaluateConfig, model_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
             split: str = "test", originals: Sequence[str | Path] | None = None) -> EvaluateResult:
    """Score the model of ``model_dir`` on one split of ``data_dir``; write metrics and plots.

    ``originals``: the ingest output folder(s) the dataset was made from; by default the test
    originals preprocess keeps in the dataset itself (``originals/``). With them the headline
    figures are the served path's (original bytes through the model server's engine) and the
    shard path's are kept as ``shards_*``; a dataset made before preprocess kept them and no
    folder given leaves the shards as the headline, and ``metrics["path"]`` says which.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not originals and split in ORIGINALS_OF and (Path(data_dir) / ORIGINALS).is_dir():
        originals = [Path(data_dir) / ORIGINALS]
    predictor = Predictor.from_dir(model_dir, resolve_device(cfg.device))
    spec = predictor.spec
    samples = read_samples(shard_urls(data_dir, split))
    if not samples:
        raise ValueError(f"{data_dir} has no '{split}' samples to evaluate on")
    # A model trained on censored 'K+1 or more' photos answers over 0..K (overflow_answer='condition'):
    # the photos above K are counted, not scored, so the figures are those of the counts it gives.
    beyond = sum(1 for s in samples if s[2] >= spec.num_classes)
    samples = [s for s in samples if s[2] < spec.num_classes]
    if not samples:
        raise ValueError(f"none of the {beyond} '{split}' photos of {data_dir} has a count this model answers")
    ids = [s[0] for s in samples]
    index = index_rows(data_dir)
    sources = label_sources(index, ids)  # "review": a person's count is the label; "metadata": the record's
    # Before any scoring: a wrong folder fails in seconds, not after the shard pass.
    found = original_paths(data_dir, ids, originals, index=index) if originals else None
    dataset = ShardDataset(samples, predictor.transform)
    loader = make_loader(dataset, batch_size=cfg.batch_size, shuffle=False, workers=0, pin_memory=False)
    # Each view's logits once: the probabilities as served (the spec's temperature) and raw ones.
    logits = np.concatenate([predictor.view_logits(x) for x, _ in loader])
    shard_probs = calibrated_probabilities(logits, spec.temperature)
    raw_probs = calibrated_probabilities(logits, 1.0)
    y = dataset.labels.numpy()
    names = list(spec.class_names) or [str(int(v)) for v in predictor.values]
    shards = _figures(y, shard_probs, spec.min_count, names)
    shards.update(measure_speed(predictor.predict_bytes, [s[1] for s in samples], cfg.latency_samples))
    del dataset, loader

    columns: dict[str, list] = {}
    if found is None:
        result, probs, answered = shards, shard_probs, np.arange(len(ids))
        result["path"] = SHARDS
    else:
        int8_file = out_dir / INT8_ONNX_FILE
        int8_file.unlink(missing_ok=True)  # a kept INT8 graph is this evaluation's only
        served, int8 = score_as_served(model_dir, ids, found, batch_size=cfg.batch_size,
                                       latency_samples=cfg.latency_samples, int8_out=int8_file,
                                       int8_batches=int8_calibration(data_dir, spec, cfg.int8_calibration_photos)
                                       if cfg.int8 else None)
        if int8 is not None:
            served, comparison = choose_precision(served, int8, y, spec, names, cfg.int8_max_accuracy_drop)
            if comparison["precision"] != "int8":
                int8_file.unlink(missing_ok=True)
        answered = np.array([i for i, p in enumerate(served.probabilities) if p is not None], dtype=np.int64)
        if not len(answered):
            first = served.refused[0]
            raise ValueError(f"the model server refuses all {len(ids)} '{split}' photos (first: {first['id']}: "
                             f"{first['status']} {first['detail']})")
        probs = np.array([served.probabilities[i] for i in answered], dtype=np.float64)
        result = _figures(y[answered], probs, spec.min_count, names)
        result.update(served.speed)
        result.update({"path": SERVED, "served_backend": served.backend, "served_refused": len(served.refused),
                       "refused": served.refused})
        if int8 is not None:
            result["int8"] = comparison
        result.update({SHARDS_PREFIX + k: shards[k] for k in _COMPARED if k in shards})
        result["shards_differ"] = int((shard_probs[answered].argmax(1) != probs.argmax(1)).sum())
        columns = {"shards_predicted_label": [int(p.argmax()) for p in shard_probs],
                   "shards_confidence": [f"{p.max():.4f}" for p in shard_probs],
                   "refused": [""] * len(ids)}
        position = {id_: i for i, id_ in enumerate(ids)}
        for r in served.refused:
            columns["refused"][position[r["id"]]] = f"{r['status']} {r['detail']}"
    result["split"] = split
    result["beyond_answers"] = beyond
    # The headline figures on the photos people counted, and on those labelled by the records.
    result.update(by_label_source(y[answered], probs, [sources[i] for i in answered], spec.min_count, names))
    source_of = dict(zip(ids, sources))
    for r in result.get("refused", []):  # not scored: counted beside, as in the headline
        section = result[REVIEWED if source_of[r["id"]] == FROM_REVIEW else RECORDED]
        section["refused"] = section.get("refused", 0) + 1
    columns[LABEL_SOURCE] = sources

    from bincounter.evaluation import plots
    from bincounter.evaluation import verdicts as V

    # Calibration on the same photos and path, the temperature the only difference (the served
    # path's answers are calibrated only: its engine runs the exported graph).
    y_answered = y[answered]
    rel_before, rel_after = M.reliability(y_answered, raw_probs[answered]), M.reliability(y_answered,
                                                                                        shard_probs[answered])
    result["calibration"] = {"temperature": spec.temperature, "count_set_threshold": spec.count_set_threshold,
                             "count_set_coverage": spec.count_set_coverage,
                             "nll_before": nll(raw_probs[answered], y_answered),
                             "nll_after": nll(shard_probs[answered], y_answered),
                             "ece_before": rel_before["ece"], "ece_after": rel_after["ece"]}
    result["nll"] = nll(probs, y_answered)
    if spec.count_set_threshold is not None:
        sets = probs >= spec.count_set_threshold
        sets[np.arange(len(probs)), probs.argmax(1)] = True  # a set is never empty
        result["calibration"]["count_set_covered"] = float(sets[np.arange(len(probs)), y_answered].mean())
        result["calibration"]["count_set_mean_size"] = float(sets.sum(1).mean())
    verdicts = V.report(y_answered + spec.min_count, probs, spec.min_count, open_ended_classes(names), cfg.verdict,
                        cfg.target_flag_precision, cfg.max_wrong_passed, confidence=cfg.target_confidence,
                        before=raw_probs[answered])
    result["verdict_chosen"] = verdicts["chosen"]
    atomic_write(out_dir / VERDICT_FILE, json.dumps(verdicts, indent=2).encode())

    plot_dir = out_dir / "plots"
    figs = [
        plots.confusion_matrix_plot(np.array(result["confusion_matrix"]), names, plot_dir / "confusion_matrix.png"),
        plots.per_class_plot(result["per_class"], plot_dir / "per_class.png"),
        plots.reliability_plot(M.reliability(y_answered, probs), plot_dir / "reliability.png"),
        plots.reliability_before_after(rel_before, rel_after, spec.temperature,
                                       plot_dir / "reliability_before_after.png"),
        plots.verdict_figures_plot([r for r in verdicts["figures"]], plot_dir / "verdict_figures.png"),
    ]
    _write_predictions(out_dir / "predictions.csv", ids, y, dict(zip(answered.tolist(), probs)), spec.min_count,
                       columns)
    atomic_write(out_dir / "metrics.json", json.dumps(result, indent=2).encode())
    _write_report(out_dir, result, figs, verdicts)
    return EvaluateResult(out_dir=out_dir, metrics=result, plots=figs, verdicts=verdicts)


def open_ended_classes(names: Sequence[str]) -> bool:
    """Whether the last class pools every count from its own up ("6+")."""
    return bool(names) and str(names[-1]).endswith("+")


def _write_predictions(path: Path, ids: list[str], y: np.ndarray, probs: dict[int, np.ndarray], min_count: int,
                       extra: dict[str, list]) -> None:
    """One row per photo: the headline path's answer (empty where the server refused the
    photo), then ``extra`` columns (the shard path's answer, the refusal)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "true_label", "predicted_label", "confidence", "expected_count", *extra])
    for i, (id_, t) in enumerate(zip(ids, y)):
        p = probs.get(i)
        values = np.arange(min_count, min_count + len(p)) if p is not None else None
        answer = [int(p.argmax()), f"{p.max():.4f}", f"{float(p @ values):.3f}"] if p is not None else ["", "", ""]
        writer.writerow([id_, int(t), *answer, *(column[i] for column in extra.values())])
    atomic_write(path, buf.getvalue().encode())


def int8_lines(c: dict) -> list[str]:
    """The report's INT8 section: both graphs' figures on the same photos, and which one is kept."""
    from bincounter.reporting import markdown_table

    kept = c["precision"] == "int8"
    rows = [[k, *(_fmt(c.get(f"{k}_{p}")) for p in ("fp32", "int8"))]
            for k in ("accuracy", "nll", "ece", "throughput_images_per_s", "latency_ms_p50")]
    return ["## INT8", "", f"The served graph quantized to INT8 (calibrated on validation photos) against fp32 on the "
            f"same photos: the same count on {c['same_count']:.1%}, accuracy {-c['accuracy_drop'] * 100:+.1f} points "
            f"against fp32 (it may lose at most {c['max_accuracy_drop'] * 100:.1f}). "
            + ("Kept: it is registered and served, and the figures above are its." if kept else
               "Not kept: the model is registered and served in fp32."), "",
            *markdown_table(["metric", "fp32", "int8"], rows)]


def calibration_lines(c: dict) -> list[str]:
    """The report's calibration paragraph: NLL and ECE before and after the temperature."""
    lines = [f"Calibration (temperature {c['temperature']:.3f}, fitted on validation photos): negative "
             f"log-likelihood {c['nll_before']:.4f} before, {c['nll_after']:.4f} after; expected calibration error "
             f"{c['ece_before']:.4f} before, {c['ece_after']:.4f} after."]
    if c.get("count_set_covered") is not None:
        lines.append(f"Count sets (threshold {c['count_set_threshold']:.3f}, for {100 * c['count_set_coverage']:.0f}% "
                     f"coverage) held the true count for {100 * c['count_set_covered']:.1f}% of these photos, with "
                     f"{c['count_set_mean_size']:.2f} counts on average.")
    return lines


def verdict_lines(v: dict) -> list[str]:
    """The report's verdict section: the thresholds chosen and the figures users choose by."""
    from bincounter.reporting import markdown_table

    chosen = v["chosen"]["posterior"]
    lines = [f"Verdicts: thresholds chosen on these {v['photos']} photos against an inventory simulated at an error "
             f"rate of {100 * v['error_rate']:g}% (off by one {100 * v['off_by_one_share']:g}% of the time, by three or "
             f"more {100 * v['off_by_more_share']:g}%, else by two), for a flag precision of at least {100 * v['target_flag_precision']:g}% and at most "
             f"{100 * v['max_wrong_passed']:g}% of the wrong records passed as matches: the posterior rule flags at "
             f"P(record right) <= {chosen['flag_threshold']:.4g} and matches at >= {chosen['match_threshold']:.4g}."]
    for rule, met in v["meets"].items():
        if met["flags_nothing"]:
            lines.append(f"No flag threshold of the {rule} rule reaches the target precision: it flags nothing.")
        if met["matches_nothing"]:
            lines.append(f"No match threshold of the {rule} rule passes few enough wrong records: it matches nothing.")
    lines += ["", *markdown_table(v["table"]["header"], v["table"]["rows"])]
    return lines


def label_source_lines(m: dict) -> list[str]:
    """The report's lines on the photos people counted (reviews) against those labelled by the
    inventory records; one line saying there are none when no photo was reviewed."""
    from bincounter.reporting import markdown_table

    reviewed, recorded = m.get(REVIEWED, {"photos": 0}), m.get(RECORDED, {"photos": 0})
    refused = [f"{f['refused']} {what} photos refused by the server are not scored." for f, what in
               ((reviewed, "reviewed"), (recorded, "recorded")) if f.get("refused")]
    if not reviewed["photos"]:
        return [f"Reviewed bins (people's counts): none of the {m['n']} scored '{m['split']}' photos has a count "
                "from a review; every figure here is against the inventory records' counts.", *refused]

    def said(f: dict) -> str:
        return (f"{f['photos']} {m['split']} photos, accuracy {f['accuracy']:.1%}, RMSE {f['rmse']:.3f}"
                if f["photos"] else "none")

    rows = [[name, f["photos"], *(_fmt(f.get(k, "")) for k in _BY_SOURCE)]
            for name, f in (("reviewed (people's counts)", reviewed), ("recorded (inventory records)", recorded))]
    return [f"Reviewed bins (people's counts): {said(reviewed)}; recorded counts (inventory records): "
            f"{said(recorded)}. A recorded count may itself be wrong; a reviewed one is what a person counted in "
            "the bin.", *refused, "",
            *markdown_table(["labels", "photos", *_BY_SOURCE], rows)]


def _fmt(value: object) -> object:
    return f"{value:.4f}" if isinstance(value, float) else value


def _write_report(out_dir: Path, m: dict, figs: list[Path], verdicts: dict) -> None:
    from bincounter.reporting import html_page, markdown_table

    if m["path"] == SERVED:
        how = [f"Scored as served: each photo's original bytes through the model server's own decoder and engine "
               f"({m['served_backend']}, on the ONNX graph registration exports), so these are the figures users "
               f"get. Held-out split '{m['split']}': {m['n']} photos answered, {m['served_refused']} refused by the "
               "server (not scored, listed below)."]
    else:
        how = [f"Scored on the preprocessed shards (the dataset keeps no original photos and none were given), not "
               f"on what the server decodes: users may get other figures. Pass the ingest output (`--originals`) "
               f"to score the served path. Held-out split '{m['split']}': {m['n']} photos."]
    if m.get("beyond_answers"):
        how.append(f"{m['beyond_answers']} more photos hold more items than this model answers (it was trained on "
                   "them as a censored 'K+1 or more' class and answers over 0..K): they are not scored.")
    rows = [[k, _fmt(m[k])] for k in _COMPARED if k in m]
    lines = [*how, "'range_*' keep true counts 0-5 only (comparable with published Amazon Bin Image Dataset "
             "results: 55.7% accuracy, RMSE 0.93).", "", *markdown_table(["metric", "value"], rows)]
    lines += ["", *label_source_lines(m)]
    if m["path"] == SERVED:
        both = [[k, _fmt(m[k]), _fmt(m[SHARDS_PREFIX + k])] for k in _COMPARED if k in m and SHARDS_PREFIX + k in m]
        lines += ["", f"Served path against the pre-resized shards training reads: the count differs on "
                  f"{m['shards_differ']} of {m['n']} photos.", "",
                  *markdown_table(["metric", "served (headline)", "shards"], both)]
        if m["refused"]:
            shown = m["refused"][:_LISTED_REFUSALS]
            more = f" (the first {len(shown)}; metrics.json lists all)" if len(m["refused"]) > len(shown) else ""
            lines += ["", f"Photos the server refuses{more}:", "",
                      *markdown_table(["id", "status", "reason"],
                                      [[r["id"], r["status"], r["detail"].replace("|", "/")] for r in shown])]
    if "int8" in m:
        lines += ["", *int8_lines(m["int8"])]
    per = [[n, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", int(v["support"])]
           for n, v in m["per_class"].items()]
    lines += ["", *markdown_table(["count", "precision", "recall", "F1", "support"], per)]
    lines += ["", *calibration_lines(m["calibration"]), "", *verdict_lines(verdicts)]
    md = ["# Evaluation", "", *lines, "", *[f"![{f.stem}](plots/{f.name})" for f in figs]]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    (out_dir / "report.html").write_text(html_page("Evaluation", lines, figs))
