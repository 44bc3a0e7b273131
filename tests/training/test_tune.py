"""Hyperparameter search on the synthetic shards with the tiny CNN.

One search, run once for the module (two real trainings, one crash), answers the questions of
most tests below: training dominates the cost, the bookkeeping is what is tested.
"""

import json
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from bincounter.training import train as train_module
from bincounter.config import SearchSpace, TuneConfig
from bincounter.training.tune import (BEST_FILE, PLOT_FILE, apply_best, launch_tune, read_trials,
                             run_trial, sample, tune)
from tests.conftest import TINY_TRAIN

# Seconds per trial, and still lr, batch size, momentum, weight decay and input size vary.
SPACE = SearchSpace(lr=(3e-4, 1e-2), batch_size=(16, 32), epochs=1, image_size=(32, 48), backbone="tiny_cnn")
BASE = TINY_TRAIN.model_copy(update={"early_stopping_patience": 0})
SEED = 5


@pytest.fixture(scope="module")
def search(data_dir, tmp_path_factory):
    """Trial 0 crashes, trial 1 trains; then a rerun asking for 3 trials trains only trial 2."""
    root = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = root / "search"
    real_train, calls, crash = train_module.train, [], [True]

    def crashes_once(cfg, *args, **kwargs):
        calls.append(cfg)
        if crash and crash.pop():
            raise RuntimeError("CUDA out of memory")
        return real_train(cfg, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "train", crashes_once)
        first = tune(BASE, TuneConfig(trials=2, seed=SEED, space=SPACE), data_dir, out, tracking_uri=uri)
        first_records = read_trials(out)
        calls_first = len(calls)
        meta = launch_tune(BASE, TuneConfig(trials=3, seed=SEED, space=SPACE), str(data_dir), str(out), tracking_uri=uri)
    return SimpleNamespace(first=first, first_records=first_records, calls_first=calls_first,
                           rerun_calls=calls[calls_first:], meta=meta, out=out, uri=uri,
                           records=read_trials(out), client=MlflowClient(uri))


def child_runs(client: MlflowClient, parent_id: str) -> dict:
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.info.run_name: r for r in runs}


@pytest.mark.slow
def test_each_trial_is_a_child_run_with_its_params_and_metrics(search):
    runs = child_runs(search.client, search.meta["mlflow_run_id"])
    assert set(runs) == {"trial-0", "trial-1", "trial-2"}
    for r in search.records:
        run = runs[f"trial-{r['trial']}"]
        assert run.info.run_id == r["run_id"]
        assert float(run.data.params["train.lr"]) == r["params"]["lr"]
        assert run.data.params["train.image_size"] == str(r["params"]["image_size"])
        assert run.data.params["train.backbone"] == "tiny_cnn"
        if r["status"] == "ok":
            assert run.info.status == "FINISHED"
            assert run.data.metrics["best_val_accuracy"] == pytest.approx(r["val_accuracy"])
            assert "val_rmse" in run.data.metrics and "train_loss" in run.data.metrics  # train()'s curves
    parent = search.client.get_run(search.meta["mlflow_run_id"])
    assert parent.data.tags["bincounter.stage"] == "tune"
    artifacts = {a.path.rsplit("/", 1)[-1] for a in search.client.list_artifacts(parent.info.run_id, "tune")}
    assert {PLOT_FILE, BEST_FILE, "trials.jsonl"} <= artifacts
    assert (search.out / PLOT_FILE).stat().st_size > 1000


@pytest.mark.slow
def test_the_best_trial_has_the_highest_val_accuracy(search):
    ok = [r for r in search.records if r["status"] == "ok"]
    best = max(ok, key=lambda r: (r["val_accuracy"], -r["val_rmse"]))
    assert search.meta["best_trial"] == best["trial"]
    assert search.meta["val_accuracy"] == best["val_accuracy"]
    saved = json.loads((search.out / BEST_FILE).read_text())
    assert saved == {**BASE.model_dump(mode="json"), **best["params"]}
    parent = search.client.get_run(search.meta["mlflow_run_id"])
    assert parent.data.tags["tune.best_trial"] == str(best["trial"])
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best["val_accuracy"])


@pytest.mark.slow
def test_a_crashed_trial_is_recorded_and_the_search_goes_on(search):
    assert [r["status"] for r in search.first_records] == ["failed", "ok"]
    failed = search.records[0]
    assert "CUDA out of memory" in failed["error"] and failed["val_accuracy"] is None
    assert search.client.get_run(failed["run_id"]).info.status == "FAILED"
    assert search.first.best_trial["trial"] == 1  # the only finished trial of the first run
    assert search.meta["trials_failed"] == 1 and search.meta["trials_ok"] == 2


@pytest.mark.slow
def test_a_rerun_runs_only_the_new_trials_under_the_same_parent(search, data_dir):
    assert search.calls_first == 2
    # Trial 2 alone trained; the failure stays recorded rather than retried.
    assert [c.lr for c in search.rerun_calls] == [sample(SPACE, SEED, 2)["lr"]]
    assert [r["trial"] for r in search.records] == [0, 1, 2]
    assert search.records[:2] == search.first_records
    assert search.meta["mlflow_run_id"] == search.first.mlflow_run_id
    # Another seed would mix two searches in one folder: refused before any training.
    with pytest.raises(ValueError, match="other settings"):
        tune(BASE, TuneConfig(trials=3, seed=SEED + 1, space=SPACE), data_dir, search.out, tracking_uri=search.uri)


@pytest.mark.slow
def test_the_same_seed_gives_the_same_trials(search):
    assert [r["params"] for r in search.records] == [sample(SPACE, SEED, i) for i in range(3)]


@pytest.mark.slow
def test_the_final_training_takes_only_the_searched_settings(search):
    best = search.records[search.meta["best_trial"]]["params"]
    final = apply_best(BASE.model_copy(update={"epochs": 7, "lr": 0.5}), search.out)
    assert final.lr == best["lr"] and final.batch_size == best["batch_size"]
    assert final.image_size == best["image_size"]
    assert final.epochs == 7  # fixed in the search (short trials), so the final training's own


def test_sampling_is_seeded_in_range_and_per_dimension():
    space = SearchSpace()
    assert [sample(space, 3, i) for i in range(5)] == [sample(space, 3, i) for i in range(5)]
    assert sample(space, 3, 0) != sample(space, 4, 0)
    for i in range(50):
        p = sample(space, 0, i)
        assert 1e-4 <= p["lr"] <= 3e-3 and 1e-5 <= p["weight_decay"] <= 1e-3 and 0.8 <= p["momentum"] <= 0.95
        assert p["batch_size"] in (16, 32, 64) and p["image_size"] in (160, 192, 224)
    # Fixing one setting leaves every other draw as it was.
    assert sample(SearchSpace(lr=1e-3), 3, 0) == {**sample(space, 3, 0), "lr": 1e-3}
    # Short trials of fixed length by default (the pipeline's search); epochs is searched when given choices.
    assert SearchSpace(lr=1e-3, backbone="resnet18").searched() == [
        "batch_size", "momentum", "weight_decay", "image_size"]
    assert SearchSpace(epochs=(4, 8)).searched()[:2] == ["lr", "batch_size"] and "epochs" in SearchSpace(
        epochs=(4, 8)).searched()
    with pytest.raises(ValueError):
        SearchSpace(backbone=("not_a_net",))
    with pytest.raises(ValueError):
        SearchSpace(lr=(1e-2, 1e-3))
    with pytest.raises(ValueError):
        TuneConfig(trials=3, budget=10)
    with pytest.raises(ValueError, match="at least one trial"):
        tune(BASE, TuneConfig(trials=0, space=SPACE), "unused", "unused")


def test_the_component_compiles_on_the_project_image(tmp_path):
    from kfp import compiler

    from components.tune import tune as component

    compiler.Compiler().compile(component, str(tmp_path / "tune.yaml"))
    text = (tmp_path / "tune.yaml").read_text()
    assert "launch.tune" in text and "ghcr.io/bincounter/bincounter" in text and "pip install" not in text


def test_tuning_off_leaves_the_training_config_alone(tmp_path):
    """trials=0: an empty artifact that a train task can take unconditionally, and no search run at all."""
    assert launch_tune(BASE, TuneConfig(trials=0, space=SPACE), "unused", str(tmp_path / "best")) == {"tuned": False}
    assert apply_best(BASE, tmp_path / "best") == BASE
    from bincounter import launch

    assert launch.tune(TuneConfig(trials=0), BASE, "unused", str(tmp_path / "off")) == {"tuned": False}


@pytest.mark.slow
def test_a_trial_without_validation_metrics_fails_and_a_search_without_a_split_is_refused(data_dir_without_val,
                                                                                          tmp_path):
    """The trial guard must fire when training returns no validation metrics, and the search itself
    must refuse a dataset without a validation split before training anything."""
    from bincounter import tracking

    params = sample(SPACE, SEED, 0)
    with tracking.stage_run("tune"):  # trials are child runs of the search's run
        record = run_trial(0, params, BASE, data_dir_without_val, tmp_path / "trial")
    assert record["status"] == "failed" and "no validation metrics" in record["error"], record
    assert record["val_accuracy"] is None
    with pytest.raises(ValueError, match="no validation split"):
        tune(BASE, TuneConfig(trials=1, seed=SEED, space=SPACE), data_dir_without_val, tmp_path / "search")
    assert not (tmp_path / "search" / "trials.jsonl").exists()
