import json

import pytest
import torch

from bincounter.training import train as train_module
from bincounter.training.train import CHECKPOINT, class_weights, emd_loss, make_ema, train
from tests.conftest import TINY_TRAIN

pytestmark = pytest.mark.slow


def test_training_learns_the_synthetic_counts(model_dir, data_dir):
    """Counting must be learnable: clearly above the majority class on held-out photos."""
    info = json.loads((data_dir / "dataset.json").read_text())
    val = info["class_counts"]["val"]
    majority = max(val.values()) / sum(val.values())
    history = json.loads((model_dir / "history.json").read_text())
    best = max(h["val_accuracy"] for h in history)
    assert best > majority + 0.15, (best, majority)
    assert (model_dir / "plots" / "training_curves.png").stat().st_size > 1000


def test_the_trained_model_is_calibrated_on_validation_photos(model_dir, data_dir):
    """After training, a temperature and the count sets' threshold are fitted on the two halves
    of the validation photos and stored in the spec, in model.pt and model_spec.json alike."""
    from bincounter.data.dataset import ShardDataset, read_samples, shard_urls
    from bincounter.model.calibration import nll, probabilities
    from bincounter.model.predictor import Predictor
    from bincounter.training.calibrate import view_logits

    spec = json.loads((model_dir / "model_spec.json").read_text())
    assert spec == json.loads(json.dumps(torch.load(model_dir / "model.pt", weights_only=True)["spec"]))
    assert spec["temperature"] != 1.0 and 0.0 < spec["count_set_threshold"] < 1.0
    assert spec["count_set_coverage"] == TINY_TRAIN.count_set_coverage
    # On the test photos (never used to fit it) the temperature lowers the NLL, the argmax stays.
    predictor = Predictor.from_dir(model_dir)
    samples = read_samples(shard_urls(data_dir, "test"))
    logits, labels = view_logits(predictor, samples, 64)
    raw, calibrated = probabilities(logits, 1.0), probabilities(logits, spec["temperature"])
    assert nll(calibrated, labels) <= nll(raw, labels) + 1e-3
    assert (raw.argmax(1) == calibrated.argmax(1)).all()
    assert len(ShardDataset(samples, predictor.transform)) == len(labels)


def interrupt_second_epoch(monkeypatch) -> dict:
    """Make the second call of train_one_epoch die like a killed process; returns the call
    counter (set it past 2 to let training run on)."""
    real_epoch = train_module.train_one_epoch
    calls = {"n": 0}

    def dies_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("spot instance reclaimed")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", dies_in_epoch_two)
    return calls


@pytest.mark.parametrize("workers", [0, 2], ids=lambda w: f"workers={w}")
def test_killed_and_resumed_training_equals_an_uninterrupted_run(data_dir, tmp_path, monkeypatch, workers):
    """With workers, the resumed run starts new DataLoader workers while the uninterrupted one
    keeps its persistent workers from epoch 1: the shuffle and the augmentations must not
    depend on which."""
    cfg = TINY_TRAIN.model_copy(update={"epochs": 3, "workers": workers})
    # On CPU train() leaves two cores to the model; let it start the workers asked for here.
    monkeypatch.setattr(train_module.os, "cpu_count", lambda: 8)
    started = []
    real_loader = train_module.make_loader
    monkeypatch.setattr(train_module, "make_loader", lambda ds, **kw: started.append(kw["workers"]) or real_loader(ds, **kw))
    train(cfg, data_dir, tmp_path / "straight")
    assert started == [workers, workers]  # train and val loaders

    calls = interrupt_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data_dir, tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)["epoch"] == 0
    calls["n"] = 10  # no more interruptions
    result = train(cfg, data_dir, tmp_path / "resumed")

    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    a = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["history"][-1]["val_accuracy"] == b["history"][-1]["val_accuracy"]


def test_resuming_with_other_settings_is_refused(data_dir, tmp_path):
    cfg = TINY_TRAIN.model_copy(update={"epochs": 1})
    train(cfg, data_dir, tmp_path / "m")
    with pytest.raises(ValueError, match="other settings"):
        train(cfg.model_copy(update={"lr": 0.1}), data_dir, tmp_path / "m")


def test_emd_loss_grows_with_distance():
    target = torch.tensor([0])
    near = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    far = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 5.0]])
    assert emd_loss(far, target) > emd_loss(near, target) > emd_loss(torch.tensor([[5.0, 0, 0, 0, 0, 0]]), target)


def test_ema_ramps_up_then_follows_the_weights_slowly():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert make_ema(model, 0.0) is None
    ema = make_ema(model, 0.9)
    torch.nn.init.zeros_(model[0].weight)
    ema.update_parameters(model)  # the first update copies
    assert torch.equal(ema.module[0].weight, model[0].weight)
    torch.nn.init.ones_(model[0].weight)
    model[1].num_batches_tracked += 7
    ema.update_parameters(model)  # decay ramps: min(0.9, 2/11) at the second update
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 1 - 2 / 11))
    assert int(ema.module[1].num_batches_tracked) == 7  # counters are copied, not averaged
    for _ in range(100):  # (1 + n) / (10 + n) reaches 0.9 at n = 80
        ema.update_parameters(model)
    before = ema.module[0].weight[0, 0].item()
    torch.nn.init.constant_(model[0].weight, 2.0)
    ema.update_parameters(model)  # the decay is 0.9 now: a tenth of the gap closes per step
    assert ema.module[0].weight[0, 0].item() == pytest.approx(before + 0.1 * (2 - before))


def test_class_weights_favour_rare_classes_with_unit_mean():
    counts = [10, 100, 1000]
    w = class_weights(counts, "sqrt_inverse")
    assert w[0] > w[1] > w[2]
    assert float((w * torch.tensor(counts, dtype=torch.float)).sum() / sum(counts)) == pytest.approx(1.0, rel=1e-5)
    assert class_weights(counts, "none") is None


def test_a_new_machine_resumes_from_the_checkpoint_mirrored_to_s3(data_dir, tmp_path, monkeypatch):
    from bincounter_demo.s3server import LocalS3

    with LocalS3() as s3:
        s3.client().create_bucket(Bucket="ckpt")
        for key, value in {"AWS_ENDPOINT_URL_S3": s3.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        cfg = TINY_TRAIN.model_copy(update={"epochs": 2, "checkpoint_uri": "s3://ckpt/jobs/1"})
        calls = interrupt_second_epoch(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, data_dir, tmp_path / "node-a")
        keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="ckpt")["Contents"]}
        assert {"jobs/1/checkpoint.pt", "jobs/1/model.pt"} <= keys

        calls["n"] = 10  # no more interruptions
        result = train(cfg, data_dir, tmp_path / "node-b")  # empty folder: a different machine
        assert calls["n"] == 11  # only the second epoch ran there
        assert [h["epoch"] for h in result.history] == [1, 2]


def test_gradient_warnings(caplog):
    from bincounter.training.train import _check_gradients

    with caplog.at_level("WARNING"):
        _check_gradients([1.0, float("nan")], epoch=0)
        _check_gradients([5e3, 1.0], epoch=1)
        _check_gradients([1e-9, 1e-9, 1e-9], epoch=2)
        _check_gradients([0.5, 1.2], epoch=3)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "non-finite" in messages[0] and "exploding" in messages[1] and "vanishing" in messages[2]


def test_profiler_trace_and_run_metrics_are_logged(data_dir, tmp_path):
    import mlflow

    from bincounter import tracking

    cfg = TINY_TRAIN.model_copy(update={"epochs": 1, "profile": True})
    with tracking.stage_run("train", cfg.flat("train.")) as run:
        train(cfg, data_dir, tmp_path / "m")
    assert list((tmp_path / "m" / "profile").glob("*.json")), "no torch.profiler trace"
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "profile"} <= artifacts
    metrics = client.get_run(run.info.run_id).data.metrics
    assert {"val_accuracy", "train_loss", "grad_norm_mean", "train_images_per_second", "train_seconds", "val_seconds",
            "step_loss", "lr"} <= set(metrics)


def test_training_throughput_leaves_validation_time_out(data_dir, tmp_path, monkeypatch):
    """A slow validation must not lower the reported training throughput; its time is reported apart."""
    import time

    real_predict = train_module.predict_probs

    def slow_validation(*args, **kwargs):
        time.sleep(1.0)
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(train_module, "predict_probs", slow_validation)
    n_train = json.loads((data_dir / "dataset.json").read_text())["sizes"]["train"]
    (h,) = train(TINY_TRAIN.model_copy(update={"epochs": 1}), data_dir, tmp_path / "m").history
    assert h["val_seconds"] >= 1.0
    assert h["train_seconds"] + h["val_seconds"] == pytest.approx(h["epoch_seconds"], abs=0.05)
    assert h["images"] == n_train // TINY_TRAIN.batch_size * TINY_TRAIN.batch_size  # drop_last
    assert h["train_images_per_second"] == pytest.approx(h["images"] / h["train_seconds"])
    assert "images_per_second" not in h  # the old name mixed validation time in


def test_without_a_validation_split_the_last_epoch_is_kept_and_training_never_stops_early(data_dir_without_val,
                                                                                          tmp_path):
    cfg = TINY_TRAIN.model_copy(update={"epochs": 3, "early_stopping_patience": 1})
    result = train(cfg, data_dir_without_val, tmp_path / "m")
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and not result.stopped_early
    assert result.calibration == {} and result.spec.temperature == 1.0  # no photos to calibrate on
    assert not any(k.startswith("val_") and k != "val_seconds" for h in result.history for k in h)
    best = torch.load(tmp_path / "m" / "model.pt", weights_only=False)
    assert best["epoch"] == 2 and result.best_epoch == 3
    ckpt = torch.load(tmp_path / "m" / CHECKPOINT, weights_only=False)
    last = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(best["model"][k], last[k]) for k in last)  # the served (EMA) weights of the last epoch


def test_a_restart_on_a_new_machine_is_a_new_run_and_register_reads_its_id(data_dir, tmp_path, monkeypatch):
    """Resuming from the mirrored checkpoint must not bring back the interrupted run's id: the
    restarted run's metrics go to the new run, and `bincounter register` reads the id file."""
    from bincounter import launch

    cfg = TINY_TRAIN.model_copy(update={"epochs": 2, "checkpoint_uri": str(tmp_path / "shared")})
    calls = interrupt_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        launch.train(cfg, str(data_dir), str(tmp_path / "node-a"))
    interrupted_run = (tmp_path / "node-a" / "mlflow_run_id").read_text()
    calls["n"] = 10  # no more interruptions
    meta = launch.train(cfg, str(data_dir), str(tmp_path / "node-b"))  # an empty folder on another machine
    assert calls["n"] == 11  # it resumed: only the second epoch ran
    assert (tmp_path / "node-b" / "mlflow_run_id").read_text() == meta["mlflow_run_id"] != interrupted_run


def test_censored_photos_and_auxiliary_targets_train_a_model_that_answers_0_to_5(data_dir_overflow, tmp_path):
    """Photos with more than 5 items train as a censored '6+' class with the metadata's item
    figures as auxiliary targets; the saved model answers over 0..5 and loads like any other."""
    from bincounter.model.networks import BEST_WEIGHTS, load_trained
    from bincounter.model.predictor import Predictor

    cfg = TINY_TRAIN.model_copy(update={"epochs": 2, "aux_weight": 0.5})
    result = train(cfg, data_dir_overflow, tmp_path / "m")
    assert result.spec.num_classes == 6 and result.spec.class_names == ("0", "1", "2", "3", "4", "5")
    saved = torch.load(tmp_path / "m" / BEST_WEIGHTS, weights_only=True)
    assert not [k for k in saved["model"] if k.startswith("aux.")]
    model, spec = load_trained(tmp_path / "m")
    assert spec.num_classes == 6
    assert all(0 <= h["val_accuracy"] <= 1 for h in result.history)
    # The checkpoint keeps the whole training model (auxiliary head and censored class included)
    # and resumes with weights_only=True.
    ckpt = torch.load(tmp_path / "m" / CHECKPOINT, weights_only=True)
    assert ckpt["model"]["aux.weight"].shape[0] == 4
    probs = Predictor(model, spec).probabilities(torch.rand(2, 3, 64, 64))
    assert probs.shape == (2, 6)
    # Evaluation on the same data scores the 0-5 photos and counts the censored ones apart.
    from bincounter.config import EvaluateConfig
    from bincounter.evaluation.evaluate import evaluate

    info = json.loads((data_dir_overflow / "dataset.json").read_text())
    test = info["class_counts"]["test"]
    scored = evaluate(EvaluateConfig(latency_samples=0), tmp_path / "m", data_dir_overflow, tmp_path / "eval")
    assert scored.metrics["beyond_answers"] == test["6+"] > 0
    assert scored.metrics["n"] == sum(test.values()) - test["6+"]
    assert "censored" in (tmp_path / "eval" / "report.md").read_text()


def test_auxiliary_loss_ignores_missing_figures():
    from bincounter.training.train import aux_loss, aux_statistics

    targets = torch.tensor([[1.0, float("nan")], [3.0, 2.0], [5.0, float("nan")]])
    mean, std = aux_statistics(targets)
    torch.testing.assert_close(mean, torch.tensor([3.0, 2.0]))
    pred = ((targets - mean) / std).nan_to_num(0.0)
    assert float(aux_loss(pred, targets, mean, std)) == 0.0
    assert float(aux_loss(pred + 1, targets, mean, std)) > 0.0
    nothing = torch.full((2, 2), float("nan"))
    assert float(aux_loss(torch.zeros(2, 2, requires_grad=True), nothing, mean, std).detach()) == 0.0
