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
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bincounter.train import BEST, CHECKPOINT, state_digest, train
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
