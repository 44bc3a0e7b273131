"""DDP on CPU: two processes under torchrun (gloo) must train one model between them.

The run goes through the real entry point, ``python -m torch.distributed.run ... -m bincounter.cli
train``, with each rank's output kept in its own log file (``--log-dir``), so the test can tell
which rank did what.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bincounter.model.networks import BEST_WEIGHTS as BEST
from bincounter.training.train import CHECKPOINT, state_digest, train
from tests.conftest import TINY_TRAIN

pytestmark = pytest.mark.slow

WORLD = 2
EPOCHS = 2
DIGEST = re.compile(r"rank (\d+)/(\d+) final model state sha256=([0-9a-f]{64})")


def _rank_logs(log_dir: Path, rank: int) -> tuple[str, str]:
    """(stdout, stderr) of one rank, from torchrun's per-rank log files."""
    (folder,) = log_dir.glob(f"*/attempt_0/{rank}")
    return (folder / "stdout.log").read_text(), (folder / "stderr.log").read_text()


def test_two_cpu_ranks_train_one_model(data_dir, tmp_path):
    cfg = TINY_TRAIN.model_copy(update={"epochs": EPOCHS})
    out, log_dir = tmp_path / "ddp", tmp_path / "torchrun-logs"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
        "--log-dir", str(log_dir), "--tee", "3",
        "-m", "bincounter.cli", "train", "--data", str(data_dir), "--out", str(out),
        "--backbone", cfg.backbone, "--pretrained", cfg.pretrained, "--image-size", str(cfg.image_size),
        "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr),
        "--workers", "0", "--freeze-early", "0", "--no-tta", "--no-progress", "--device", "cpu",
    ]
    # MLFLOW_TRACKING_URI and BINCOUNTER_HOME come from the autouse isolated_home fixture.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"torchrun exited {proc.returncode} after {seconds:.0f}s\n{proc.stderr[-4000:]}"

    # Both ranks finished with bit-identical weights (train() also raises if they do not) ...
    digests = {}
    for rank in range(WORLD):
        stdout, stderr = _rank_logs(log_dir, rank)
        found = DIGEST.findall(stderr)
        assert len(found) == 1, (rank, stderr[-2000:])
        assert (int(found[0][0]), int(found[0][1])) == (rank, WORLD)
        digests[rank] = found[0][2]
    assert digests[0] == digests[1]

    # ... and rank 0 alone wrote the outputs and reported: the other rank printed no epoch lines
    # and no result, and the checkpoint holds exactly the weights both ranks ended with.
    rank0_out, _ = _rank_logs(log_dir, 0)
    rank1_out, _ = _rank_logs(log_dir, 1)
    assert len(re.findall(r"^epoch=\d+ val_accuracy=", rank0_out, re.M)) == EPOCHS
    assert '"mlflow_run_id"' in rank0_out
    assert "epoch=" not in rank1_out and "mlflow_run_id" not in rank1_out
    for name in (CHECKPOINT, BEST, "model_spec.json", "history.json", "mlflow_run_id"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp")), "a half-written checkpoint was left behind"
    ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == EPOCHS - 1
    # The ranks compare (and serve) the EMA of the weights; the checkpoint keeps it beside the raw weights.
    ema_weights = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert state_digest(ema_weights) == digests[0]
    assert state_digest(ckpt["model"]) != digests[0]

    # Each rank saw half the training split, so an epoch took about half the steps of one process.
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    n_train = json.loads((data_dir / "dataset.json").read_text())["sizes"]["train"]
    single = train(cfg.model_copy(update={"epochs": 1}), data_dir, tmp_path / "single").history[0]["steps"]
    assert single == n_train // cfg.batch_size
    for h in history:
        assert h["steps"] == math.ceil(n_train / WORLD) // cfg.batch_size
        assert abs(WORLD * h["steps"] - single) <= WORLD, (h["steps"], single)


def test_a_train_task_with_several_gpus_runs_one_ddp_rank_per_gpu(data_dir, tmp_path, monkeypatch):
    """``launch.train``, what the pipeline's train component calls, on a machine with several GPUs
    (``--cluster.gpus N``) starts one DDP rank per GPU under torch.distributed.run; two CPU ranks
    (gloo) stand in for two GPUs here. Rank 0's MLflow run and result come back to the caller."""
    import mlflow

    from bincounter import launch
    from bincounter.training import train as training

    monkeypatch.setattr(training, "processes_per_node", lambda cfg: WORLD)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = TINY_TRAIN.model_copy(update={"epochs": 1})
    out, curves = tmp_path / "model", tmp_path / "curves.html"
    meta = launch.train(cfg, str(data_dir), str(out), curves_html=str(curves))

    assert meta["best_epoch"] == 1 and meta["backbone"] == cfg.backbone
    assert (out / "mlflow_run_id").read_text() == meta["mlflow_run_id"]
    run = mlflow.get_run(meta["mlflow_run_id"])
    assert run.data.params["train.epochs"] == "1" and "train_images_per_second" in run.data.metrics
    assert "best epoch 1" in curves.read_text()
    # Each rank trained on half the split: the steps of a two-process job, not of one.
    n_train = json.loads((data_dir / "dataset.json").read_text())["sizes"]["train"]
    (epoch,) = json.loads((out / "history.json").read_text())
    assert epoch["steps"] == math.ceil(n_train / WORLD) // cfg.batch_size < n_train // cfg.batch_size


def test_a_failing_rank_fails_the_data_parallel_train_task(tmp_path, monkeypatch):
    from bincounter import launch
    from bincounter.training import train as training

    monkeypatch.setattr(training, "processes_per_node", lambda cfg: WORLD)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match=f"{WORLD} processes under torch.distributed.run"):
        launch.train(TINY_TRAIN, str(tmp_path / "no-dataset-here"), str(tmp_path / "model"))


# One rank of a multi-node job, started the way each node's launcher starts it (RANK, WORLD_SIZE,
# MASTER_*), optionally dying like a preempted pod at the start of the epoch DIE_IN_EPOCH.
RANK_SCRIPT = """
import os, sys
from bincounter.training import train as training
if os.environ.get("DIE_IN_EPOCH"):
    real, calls = training.train_one_epoch, [0]
    def dies(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(os.environ["DIE_IN_EPOCH"]):
            os._exit(17)
        return real(*args, **kwargs)
    training.train_one_epoch = dies
from bincounter.cli import main
main(sys.argv[1:])
"""
RESUMED = re.compile(r"rank (\d+)/(\d+) resumed at epoch (\d+), weights sha256=([0-9a-f]{64})")


def _run_ranks(data_dir: Path, outs: list[Path], shared: Path, cwd: Path, die_in_epoch: int | None = None,
               timeout: float = 240, extra: tuple[str, ...] = ()) -> list[tuple[int, str, str]]:
    """Both ranks of a 2-node job, each with its own output folder; (exit code, stdout, stderr) per rank."""
    from bincounter_demo.s3server import free_port

    cfg = TINY_TRAIN.model_copy(update={"epochs": EPOCHS})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("DIE_IN_EPOCH", None)
    if die_in_epoch:
        env["DIE_IN_EPOCH"] = str(die_in_epoch)
    procs = []
    for rank, out in enumerate(outs):
        cmd = [sys.executable, "-c", RANK_SCRIPT, "train", "--data", str(data_dir), "--out", str(out),
               "--backbone", cfg.backbone, "--pretrained", cfg.pretrained, "--image-size", str(cfg.image_size),
               "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr),
               "--workers", "0", "--freeze-early", "0", "--no-tta", "--no-progress", "--device", "cpu",
               "--checkpoint-uri", str(shared), *extra]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env={**env, "RANK": str(rank), "LOCAL_RANK": "0"},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            results.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:  # ranks that wait forever for a peer that went another way
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def test_a_multi_node_job_resumes_every_rank_from_the_shared_checkpoint(data_dir, tmp_path):
    """Two nodes, each with its own output folder (a worker's is an emptyDir) and one shared
    checkpoint folder. Preempted in epoch 2 and restarted on fresh folders, both ranks resume at
    epoch 2 with the same weights, finish identical, and the restarted MLflow run's id is the one
    left for `bincounter register`."""
    shared = tmp_path / "shared-checkpoints"
    outs = [tmp_path / "node-0", tmp_path / "node-1"]
    first = _run_ranks(data_dir, outs, shared, tmp_path, die_in_epoch=2)
    assert [code for code, _, _ in first] == [17, 17], [err[-2000:] for _, _, err in first]
    assert torch.load(shared / CHECKPOINT, weights_only=False)["epoch"] == 0
    first_run_id = (outs[0] / "mlflow_run_id").read_text()
    for out in outs:  # the restarted pods get new, empty folders
        shutil.rmtree(out, ignore_errors=True)

    second = _run_ranks(data_dir, outs, shared, tmp_path)
    assert [code for code, _, _ in second] == [0, 0], [err[-3000:] for _, _, err in second]
    resumed = [RESUMED.findall(err) for _, _, err in second]
    assert [[(int(r), int(w), int(e)) for r, w, e, _ in found] for found in resumed] == [[(0, 2, 2)], [(1, 2, 2)]]
    assert resumed[0][0][3] == resumed[1][0][3], "the ranks resumed with different weights"
    digests = [DIGEST.findall(err) for _, _, err in second]
    assert len(digests[0]) == len(digests[1]) == 1 and digests[0][0][2] == digests[1][0][2]
    history = json.loads((outs[0] / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert not (outs[1] / CHECKPOINT).exists()  # workers write nothing of their own

    # The restarted run is a new MLflow run, and its id is the one register will read.
    stdout = second[0][1]
    result = json.loads(stdout[stdout.rindex("\n{") + 1:])  # the CLI's result, after the epoch lines
    assert (outs[0] / "mlflow_run_id").read_text() == result["mlflow_run_id"] != first_run_id


def test_the_ranks_share_the_teachers_pass_and_all_learn_from_every_photos_targets(data_dir, model_dir, tmp_path):
    """Distillation under DDP: each rank scores every other training photo with the teachers, the
    shares are gathered in photo order (rank 0 keeps them: the same as one process scoring the
    whole split), and the replicas end bit-identical."""
    import numpy as np

    from bincounter.data.dataset import load_split
    from bincounter.training.distill import CACHE, teacher_probabilities
    from bincounter.model.transforms import EvalTransform

    outs = [tmp_path / "node-0", tmp_path / "node-1"]
    results = _run_ranks(data_dir, outs, tmp_path / "shared", tmp_path, extra=("--teachers", str(model_dir)))
    assert [code for code, _, _ in results] == [0, 0], [err[-3000:] for _, _, err in results]
    digests = [DIGEST.findall(err) for _, _, err in results]
    assert len(digests[0]) == len(digests[1]) == 1 and digests[0][0][2] == digests[1][0][2]
    assert (outs[0] / CACHE).is_file() and not (outs[1] / CACHE).exists()

    train_ds = load_split(data_dir, "train", EvalTransform(size=32, mean=(0.5,) * 3, std=(0.5,) * 3))
    n = len(train_ds)
    for rank, (_, _, err) in enumerate(results):
        assert f"rank {rank}/{WORLD} scored {len(range(rank, n, WORLD))} of the {n} training photos" in err
    with np.load(outs[0] / CACHE) as kept:
        assert list(kept["ids"]) == train_ds.ids
        whole = teacher_probabilities([str(model_dir)], train_ds, list(json.loads(
            (data_dir / "dataset.json").read_text())["classes"]), progress=False)
        np.testing.assert_allclose(kept["probs"], whole, atol=1e-5)
