"""Hyperparameter search: seeded random search over the training settings, one MLflow child
run per trial under a parent "tune" run; the best trial's settings feed the final training.

Random search, not a library tuner: optuna is not among the project's dependencies, and with
a few dozen trials random search is a strong baseline. Trial ``i`` is drawn from its own
generator seeded with ``(seed, i)``, so the same seed gives the same trials in any order, a
rerun can skip the trials already recorded, and raising ``trials`` only appends new ones.
The Katib Experiment in ``manifests/katib`` runs the same search space on a cluster.

Outputs in ``out_dir``: ``trials.jsonl`` (one record per trial, failures included),
``best.json`` (the best trial's whole TrainConfig), ``search.json`` (what was searched),
``tune_trials.png`` and ``trials/trial-NNN/`` (each trial's training folder).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from bincounter import tracking
from bincounter.config import LOG_SCALE, RANGES, SearchSpace, TrainConfig, TuneConfig
from bincounter.fileio import atomic_write

log = logging.getLogger(__name__)

TRIALS_FILE = "trials.jsonl"
BEST_FILE = "best.json"
SEARCH_FILE = "search.json"
PLOT_FILE = "tune_trials.png"
PARENT_RUN_FILE = "mlflow_run_id"

MINIMIZE = frozenset({"val_rmse"})
VAL_METRICS = ("val_accuracy", "val_rmse", "val_macro_f1", "val_within_1")


@dataclass
class TuneResult:
    best: TrainConfig
    best_trial: dict
    trials: list[dict] = field(default_factory=list)
    out_dir: Path | None = None
    mlflow_run_id: str | None = None


# ---------------------------------------------------------------- sampling

def sample(space: SearchSpace, seed: int, index: int) -> dict:
    """Trial ``index``'s settings. Every dimension consumes its draw even when fixed, so fixing
    one setting leaves the others' values unchanged."""
    rng = np.random.default_rng([seed, index])
    params = {}
    for name, values in space:
        if name in RANGES:
            params[name] = _draw_range(rng, *values, log=name in LOG_SCALE)
        else:
            value = values[int(rng.integers(len(values)))]
            params[name] = value.item() if isinstance(value, np.generic) else value
    return params


def _draw_range(rng: np.random.Generator, low: float, high: float, *, log: bool) -> float:
    u = rng.random()
    if low == high:
        return float(low)
    value = math.exp(math.log(low) + u * (math.log(high) - math.log(low))) if log else low + u * (high - low)
    # Four significant digits read well in MLflow and lose nothing a trial could notice.
    return min(max(float(f"{value:.4g}"), low), high)


def trial_config(base: TrainConfig, params: dict) -> TrainConfig:
    """The base config with a trial's settings, validated (``model_copy`` would not check them)."""
    return TrainConfig.model_validate({**base.model_dump(), **params})


# ---------------------------------------------------------------- records

def read_trials(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / TRIALS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_trials(out_dir: Path, records: list[dict]) -> None:
    # Rewritten whole and atomically: a kill mid-write never leaves a torn last line.
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records, key=lambda r: r["trial"]))
    atomic_write(out_dir / TRIALS_FILE, lines.encode())


def _normalized(obj: object) -> object:
    """As it reads back from JSON (tuples become lists), for comparisons with recorded values."""
    return json.loads(json.dumps(obj))


def _check_same_trial(record: dict, params: dict, base: TrainConfig) -> None:
    """Refuse to resume a search whose seed, space or base config changed underneath it."""
    expected = _normalized(params)
    same = record["params"] == expected
    if same and record.get("config") is not None:
        same = record["config"] == _normalized(trial_config(base, params).model_dump())
    if not same:
        raise ValueError(f"trial {record['trial']} in {TRIALS_FILE} was run with other settings; "
                         "use a new output folder or delete it to start over")


def score(record: dict, metric: str) -> tuple:
    """Sort key, higher is better: the metric, then RMSE (or accuracy), then the earlier trial."""
    sign = -1.0 if metric in MINIMIZE else 1.0
    tie = record["val_accuracy"] if metric == "val_rmse" else -record["val_rmse"]
    return (sign * record[metric], tie, -record["trial"])


def best_record(records: list[dict], metric: str) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        raise RuntimeError(f"all {len(records)} trials failed; see {TRIALS_FILE} for the errors")
    return max(ok, key=lambda r: score(r, metric))


# ---------------------------------------------------------------- one trial

def run_trial(index: int, params: dict, base: TrainConfig, data_dir: str | Path, out_dir: Path) -> dict:
    """Train one trial inside a nested MLflow run; a crash becomes a "failed" record."""
    import mlflow

    from bincounter.training import train as training  # torch loads only when a trial runs

    record = {"trial": index, "params": _normalized(params), "config": None, "status": "failed",
              "run_id": None, "error": None, "best_epoch": None, **{k: None for k in VAL_METRICS}}
    t0 = time.perf_counter()
    trial_dir = out_dir / "trials" / f"trial-{index:03d}"
    try:
        # Leaving this block by an exception marks the child run FAILED in MLflow.
        with mlflow.start_run(nested=True, run_name=f"trial-{index}",
                              tags={"bincounter.stage": "tune-trial", "tune.trial": str(index)}) as run:
            record["run_id"] = run.info.run_id
            # The sampled values first: they are on the run even if the config turns them down.
            mlflow.log_params({f"train.{k}": str(v) for k, v in params.items()})
            cfg = trial_config(base, params)
            record["config"] = _normalized(cfg.model_dump())
            mlflow.log_params({k: str(v) for k, v in cfg.flat("train.").items()})
            result = training.train(cfg, data_dir, trial_dir)
            if not all(k in result.best for k in VAL_METRICS):
                raise RuntimeError("training produced no validation metrics (empty validation split?)")
            record.update({k: float(result.best[k]) for k in VAL_METRICS}, best_epoch=result.best_epoch,
                          status="ok")
            tracking.log_metrics({f"best_{k}": record[k] for k in VAL_METRICS} | {"best_epoch": result.best_epoch})
    except Exception as exc:  # noqa: BLE001 - one bad combination must not end the search
        log.warning("trial %d failed: %s: %s", index, type(exc).__name__, exc, exc_info=True)
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _drop_weights(trial_dir: Path) -> None:
    """The final training retrains from scratch; trial weights would only fill the artifact store."""
    for name in ("model.pt", "checkpoint.pt"):
        (trial_dir / name).unlink(missing_ok=True)


# ---------------------------------------------------------------- the search

def tune(base: TrainConfig, tcfg: TuneConfig, data_dir: str | Path, out_dir: str | Path, *,
         tracking_uri: str | None = None, experiment: str = "bincounter") -> TuneResult:
    """Run ``tcfg.trials`` trials of ``tcfg.space`` in sequence under one parent MLflow run; resumes
    from ``out_dir``.

    ``base`` supplies every setting the space does not vary. Returns the best trial's config.
    """
    if tcfg.trials < 1:
        raise ValueError("a search needs at least one trial (TuneConfig.trials)")
    space = tcfg.space
    _require_validation(data_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {r["trial"]: r for r in read_trials(out_dir)}
    for index, record in done.items():
        _check_same_trial(record, sample(space, tcfg.seed, index), base)
    atomic_write(out_dir / SEARCH_FILE, json.dumps({"space": space.model_dump(), "tune": tcfg.model_dump(),
                                                    "base": base.model_dump()}, indent=2).encode())

    parent_id = _resumable_parent(out_dir, tracking_uri, experiment)
    params = None if parent_id else tcfg.flat("tune.")
    with tracking.stage_run("tune", params, tracking_uri=tracking_uri, experiment=experiment,
                            run_id=parent_id) as parent:
        atomic_write(out_dir / PARENT_RUN_FILE, parent.info.run_id.encode())
        for index in range(tcfg.trials):
            if index in done:
                log.info("trial %d already recorded, skipped", index)
                continue
            record = run_trial(index, sample(space, tcfg.seed, index), base, data_dir, out_dir)
            done[index] = record
            _write_trials(out_dir, list(done.values()))
            if not tcfg.keep_weights:
                _drop_weights(out_dir / "trials" / f"trial-{index:03d}")
            if record["status"] == "ok":
                # The parent's own curve: each trial's score against its index.
                tracking.log_metrics({f"trial_{tcfg.metric}": record[tcfg.metric]}, step=index)

        records = sorted(done.values(), key=lambda r: r["trial"])
        best = best_record(records, tcfg.metric)
        best_cfg = TrainConfig.model_validate(best["config"])
        atomic_write(out_dir / BEST_FILE, best_cfg.model_dump_json(indent=2).encode())
        _log_best(best, records, tcfg, out_dir)
    return TuneResult(best=best_cfg, best_trial=best, trials=records, out_dir=out_dir,
                      mlflow_run_id=parent.info.run_id)


def _require_validation(data_dir: str | Path) -> None:
    """A search ranks trials by validation metrics: without a validation split every trial would
    fail, so say so once, up front."""
    from bincounter.data.dataset import materialize
    from bincounter.data.preprocess import load_dataset_info

    if not load_dataset_info(materialize(data_dir))["sizes"]["val"]:
        raise ValueError(f"{data_dir} has no validation split (preprocess val_fraction=0): a search needs one "
                         "to compare trials")


def _resumable_parent(out_dir: Path, tracking_uri: str | None, experiment: str) -> str | None:
    """A rerun in the same folder continues the same parent run, if the store still has it."""
    marker = out_dir / PARENT_RUN_FILE
    if not marker.exists():
        return None
    from mlflow import MlflowClient

    tracking.configure(tracking_uri, experiment)
    try:
        return MlflowClient().get_run(marker.read_text().strip()).info.run_id
    except Exception:  # noqa: BLE001 - another store, or the run was deleted: start afresh
        return None


def _log_best(best: dict, records: list[dict], tcfg: TuneConfig, out_dir: Path) -> None:
    """Best trial on the parent run: metrics, tags (params are write-once, the best may change on
    a resumed search), best.json and the plot."""
    import mlflow

    failed = sum(r["status"] != "ok" for r in records)
    tracking.log_metrics({**{f"best_{k}": best[k] for k in VAL_METRICS}, "best_trial": best["trial"],
                          "trials_ok": len(records) - failed, "trials_failed": failed})
    mlflow.set_tags({"tune.best_trial": str(best["trial"]), "tune.best_run_id": str(best["run_id"]),
                     **{f"tune.best.{k}": str(v) for k, v in best["params"].items()}})
    plot = trials_plot(records, tcfg.metric, out_dir / PLOT_FILE)
    tracking.log_artifacts([out_dir / BEST_FILE, out_dir / TRIALS_FILE, plot], "tune")


def trials_plot(records: list[dict], metric: str, path: Path) -> Path:
    """Each finished trial's metric against its learning rate, one colour per backbone."""
    from bincounter.reporting import plt, save_figure

    ok = [r for r in records if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for backbone in sorted({r["params"]["backbone"] for r in ok}):
        mine = [r for r in ok if r["params"]["backbone"] == backbone]
        ax.scatter([r["params"]["lr"] for r in mine], [r[metric] for r in mine], label=backbone, alpha=0.8)
    if ok:
        best = best_record(records, metric)
        ax.scatter([best["params"]["lr"]], [best[metric]], marker="*", s=250, facecolors="none",
                   edgecolors="black", label=f"best (trial {best['trial']})")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(metric)
    ax.set_title(f"{len(ok)} trials finished, {len(records) - len(ok)} failed")
    return save_figure(fig, path)


# ---------------------------------------------------------------- feeding the final training

def best_params(tune_dir: str | Path) -> dict:
    """The best trial's values of the dimensions the search varied (a fixed dimension, such as
    short trial epochs, stays the final training's own choice)."""
    tune_dir = Path(tune_dir)
    best = json.loads((tune_dir / BEST_FILE).read_text())
    space = SearchSpace.model_validate(json.loads((tune_dir / SEARCH_FILE).read_text())["space"])
    return {name: best[name] for name in space.searched()}


def apply_best(cfg: TrainConfig, tune_dir: str | Path) -> TrainConfig:
    """``cfg`` with the searched settings of a tune output folder's best trial.

    A folder without ``best.json`` (tuning switched off, see ``launch_tune``) leaves ``cfg`` as is,
    so a pipeline's train task can take the tune artifact unconditionally.
    """
    if not (Path(tune_dir) / BEST_FILE).exists():
        return cfg
    return trial_config(cfg, best_params(tune_dir))


def launch_tune(base: TrainConfig, tcfg: TuneConfig, data_dir: str, out_dir: str, *,
                tracking_uri: str | None = None, experiment: str = "bincounter") -> dict:
    """The KFP component's entry point: search, then return the metadata for the ``best`` artifact.

    No trials switches tuning off: an empty folder, which ``apply_best`` ignores.
    """
    from bincounter.data.dataset import materialize
    from bincounter.data.preprocess import load_dataset_info

    if tcfg.trials == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return {"tuned": False}
    data_dir = str(materialize(data_dir))
    space = fit_to_data(tcfg.space, load_dataset_info(data_dir)["config"]["image_size"])
    tcfg = tcfg.model_copy(update={"space": space})
    r = tune(base, tcfg, data_dir, out_dir, tracking_uri=tracking_uri, experiment=experiment)
    failed = sum(t["status"] != "ok" for t in r.trials)
    return {"tuned": True, "mlflow_run_id": r.mlflow_run_id, "best_trial": r.best_trial["trial"],
            "best_run_id": r.best_trial["run_id"], "metric": tcfg.metric,
            **{k: r.best_trial[k] for k in VAL_METRICS}, "trials_ok": len(r.trials) - failed,
            "trials_failed": failed, "searched": ",".join(space.searched()),
            **{name: getattr(r.best, name) for name in SearchSpace.model_fields}}


def fit_to_data(space: SearchSpace, data_image_size: int) -> SearchSpace:
    """Drop input sizes above the shards' own: upsampling adds compute, not information."""
    sizes = tuple(s for s in space.image_size if s <= data_image_size) or (data_image_size,)
    return space.model_copy(update={"image_size": sizes})
