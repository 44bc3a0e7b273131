"""bincounter.sagemaker.entry: SageMaker's training contract on a temporary /opt/ml.

The resume test runs the entry point as SageMaker does (a process of its own), kills it with
SIGKILL in the middle of an epoch, starts it again on a fresh scratch folder and checks that it
continued from the checkpoint folder instead of starting over.

The two-host test starts the entry point twice on loopback, each "instance" with its own /opt/ml
and resourceconfig.json: the same hosts list, a different current_host. Only the first host's
name is ever resolved (it is the rendezvous address; gloo finds the peers through the store and
the network interface the file names), so the test names the first host "127.0.0.1", the
second "algo-2" as SageMaker would, and gives "lo" as the network interface.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bincounter.sagemaker import entry
from bincounter.config import TrainConfig

SRC = Path(__file__).resolve().parents[2] / "src"

# Small batches make an epoch long enough (dozens of steps) to be killed in its middle.
JOB_TRAIN = TrainConfig(backbone="tiny_cnn", pretrained="none", image_size=64, epochs=4, batch_size=8, lr=3e-3,
                        workers=0, freeze_early=0, progress=False, tta=False, ema_decay=0.0,
                        early_stopping_patience=0)


def make_layout(root: Path, data_dir: Path | None, cfg: TrainConfig | None = JOB_TRAIN) -> entry.Layout:
    layout = entry.Layout(root)
    layout.hyperparameters.parent.mkdir(parents=True)
    if cfg is not None:
        layout.hyperparameters.write_text(json.dumps(entry.to_hyperparameters(cfg)))
    if data_dir is not None:
        shutil.copytree(data_dir, layout.channel())
    return layout


# --------------------------------------------------------------------------- hyperparameters


def test_hyperparameters_are_strings_and_parse_back_to_the_same_config() -> None:
    cfg = JOB_TRAIN.model_copy(update={"lr": 0.00125, "rot90": True, "amp": "bf16"})
    hp = entry.to_hyperparameters(cfg)
    assert all(isinstance(v, str) for v in hp.values())
    assert hp["epochs"] == "4" and hp["rot90"] == "true" and hp["backbone"] == "tiny_cnn"
    assert set(hp) == set(TrainConfig.model_fields) - {"checkpoint_uri"}
    assert entry.parse_hyperparameters(json.loads(json.dumps(hp))) == cfg


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs": "many"}, "epochs"),
        ({"learning_rate": "0.1"}, "learning_rate"),  # not a TrainConfig field: refused, not ignored
        ({"backbone": "resnet9000"}, "backbone"),
        ({"checkpoint_uri": "s3://elsewhere"}, "checkpoint folder"),
    ],
)
def test_bad_hyperparameters_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        entry.parse_hyperparameters(values)


def test_the_job_checkpoints_to_the_layouts_folder(tmp_path: Path) -> None:
    layout = make_layout(tmp_path, None)
    assert entry.read_config(layout).checkpoint_uri == str(tmp_path / "checkpoints")


# --------------------------------------------------------------------------- failures


def test_a_missing_channel_becomes_the_failure_reason(tmp_path: Path) -> None:
    layout = make_layout(tmp_path, None)
    assert entry.run(layout) == 1
    reason = layout.failure.read_text()
    assert reason.startswith("FileNotFoundError: input channel 'training'")
    assert "dataset.json" in reason.splitlines()[0]
    assert not layout.model.exists()


def test_bad_hyperparameters_become_the_failure_reason(tmp_path: Path) -> None:
    layout = make_layout(tmp_path, None, cfg=None)
    layout.hyperparameters.write_text(json.dumps({"epochs": "0"}))
    assert entry.run(layout) == 1
    first = layout.failure.read_text().splitlines()[0]
    assert first.startswith("ValidationError") and "epochs" in layout.failure.read_text()


@pytest.mark.parametrize(("config", "message"), [
    ({"current_host": "algo-3", "hosts": ["algo-1", "algo-2"]}, "current_host 'algo-3' is not one of the hosts"),
    ({"current_host": "algo-1", "hosts": []}, "non-empty list"),
    ({"current_host": "algo-1", "hosts": ["algo-1", "algo-1"]}, "twice"),
])
def test_a_resource_config_that_makes_no_sense_becomes_the_failure_reason(tmp_path: Path, config: dict,
                                                                          message: str) -> None:
    layout = make_layout(tmp_path, None)
    layout.resource_config.write_text(json.dumps(config))
    assert entry.run(layout) == 1
    assert message in layout.failure.read_text().splitlines()[0]


def test_each_host_finds_its_node_rank_and_the_rendezvous_host(tmp_path: Path) -> None:
    layout = make_layout(tmp_path, None)
    assert entry.read_cluster(layout) == entry.Cluster()  # no resourceconfig.json: one host
    assert entry.Cluster().master == "127.0.0.1"
    hosts = ["algo-1", "algo-10", "algo-2"]  # SageMaker sorts them as text
    layout.resource_config.write_text(json.dumps({"current_host": "algo-2", "hosts": hosts,
                                                  "network_interface_name": "eth0"}))
    cluster = entry.read_cluster(layout)
    assert (cluster.nnodes, cluster.node_rank, cluster.master, cluster.network_interface) == (3, 2, "algo-1", "eth0")


def test_the_launcher_command_is_what_torch_distributed_run_parses() -> None:
    from torch.distributed.run import get_args_parser

    cluster = entry.Cluster(("algo-1", "algo-2"), "algo-2", "eth0")
    cmd = entry.launcher_command(cluster, nproc=4, port=7777)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    args = get_args_parser().parse_args(cmd[3:])
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "4")
    assert (args.rdzv_backend, args.master_addr, args.master_port, args.max_restarts) == ("static", "algo-1", 7777, 0)
    assert args.module and args.training_script == "bincounter.sagemaker.entry"
    assert args.training_script_args == ["worker"]


def test_the_processes_per_host_follow_the_gpus_only_when_the_device_is_auto(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert entry.processes_per_host(JOB_TRAIN) == 4
    assert entry.processes_per_host(JOB_TRAIN.model_copy(update={"device": "cuda:1"})) == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert entry.processes_per_host(JOB_TRAIN) == 1  # CPU: one process


def test_the_first_host_is_waited_for_until_its_name_resolves(monkeypatch) -> None:
    import socket

    real, calls = socket.getaddrinfo, []

    def late(name, *args):  # SageMaker may publish the names after the containers start
        calls.append(name)
        if len(calls) < 3:
            raise socket.gaierror(-2, "Name or service not known")
        return real("127.0.0.1", *args)

    monkeypatch.setattr(entry.socket, "getaddrinfo", late)
    entry.wait_for_host("algo-1", timeout=10, poll=0.01)
    assert calls == ["algo-1"] * 3
    monkeypatch.setattr(entry.socket, "getaddrinfo", real)
    with pytest.raises(RuntimeError, match="did not resolve within 0 s"):
        entry.wait_for_host("bincounter-no-such-host.invalid", timeout=0.1, poll=0.05)


def test_only_the_train_argument_is_accepted() -> None:
    assert entry.main(["serve"]) == 2


# --------------------------------------------------------------------------- metrics


def parse_metrics(text: str) -> dict[str, list[float]]:
    """What SageMaker does with MetricDefinitions: each log line searched, the first group kept."""
    found: dict[str, list[float]] = {d["Name"]: [] for d in entry.METRIC_DEFINITIONS}
    for line in text.splitlines():
        for d in entry.METRIC_DEFINITIONS:
            match = re.search(d["Regex"], line)
            if match:
                found[d["Name"]].append(float(match.group(1)))
    return found


def test_metric_regexes_keep_names_apart() -> None:
    text = ("epoch=3 val_accuracy=0.8125 val_rmse=0.5000 train_loss=1.2e-01\n"
            "epoch 4/8: 100%|#####| loss=0.3\n"
            "best_epoch=3 best_val_accuracy=0.8125 best_val_rmse=0.5000\n")
    found = parse_metrics(text)
    assert found["epoch"] == [3.0]
    assert found["val_accuracy"] == [0.8125]  # not also best_val_accuracy's value
    assert found["train_loss"] == [0.12]
    assert found["best_epoch"] == [3.0] and found["best_val_rmse"] == [0.5]


def test_metric_regexes_use_no_engine_specific_syntax() -> None:
    for definition in entry.METRIC_DEFINITIONS:
        for construct in ("(?<", "(?=", "(?!", "(?P"):  # look-arounds and named groups
            assert construct not in definition["Regex"]
        assert re.compile(definition["Regex"]).groups == 1


def test_metric_definitions_satisfy_the_sagemaker_api_model() -> None:
    import botocore.session

    api = botocore.session.get_session().get_service_model("sagemaker")
    shape = api.shape_for("MetricDefinition")
    for definition in entry.METRIC_DEFINITIONS:
        assert set(definition) == set(shape.members)
        assert len(definition["Regex"]) <= shape.members["Regex"].metadata["max"]


# --------------------------------------------------------------------------- kill and resume


def _start(layout: entry.Layout, scratch: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, entry.ROOT_ENV: str(layout.root), "TMPDIR": str(scratch), "PYTHONPATH": str(SRC),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)  # the container has no MLflow: the component logs the metrics
    return subprocess.Popen([sys.executable, "-m", "bincounter.sagemaker.entry", "train"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _checkpoint_epoch(layout: entry.Layout) -> int | None:
    path = layout.checkpoints / "checkpoint.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"] if path.exists() else None


@pytest.mark.slow
def test_killed_mid_epoch_the_job_resumes_from_its_checkpoint_folder(tmp_path: Path, data_dir: Path) -> None:
    layout = make_layout(tmp_path / "ml", data_dir)
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    first = _start(layout, scratch)
    try:
        deadline = time.monotonic() + 240
        # Wait for epoch 2's checkpoint (epoch index 1) to reach the checkpoint folder, then kill
        # the process while epoch 3 is under way.
        while _checkpoint_epoch(layout) != 1:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "epoch 2 never finished"
            time.sleep(0.02)
        assert first.poll() is None, "the job ended before it could be interrupted"
        first.send_signal(signal.SIGKILL)
        out1, _ = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == -signal.SIGKILL
    assert [int(e) for e in re.findall(r"^epoch=(\d+) ", out1, re.M)] == [1, 2]  # epoch 3 never finished
    assert not layout.model.exists() and not layout.failure.exists()

    second = _start(layout, scratch)
    out2, err2 = second.communicate(timeout=300)
    assert second.returncode == 0, err2

    assert "resumed at epoch 3" in err2
    metrics = parse_metrics(out2)
    assert metrics["epoch"] == [3.0, 4.0]  # continued at epoch 3, not restarted at 1
    assert len(metrics["val_accuracy"]) == 2 and len(metrics["train_loss"]) == 2
    assert len(metrics["best_val_accuracy"]) == 1
    history = json.loads((layout.model / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # the first run's epochs came back with the checkpoint
    assert _checkpoint_epoch(layout) == 3

    # The model folder is what evaluate and register read.
    from bincounter.model.predictor import Predictor

    assert sorted(p.name for p in layout.model.iterdir()) == sorted([*entry.MODEL_FILES, "train_config.json"])
    predictor = Predictor.from_dir(layout.model)
    assert predictor.spec.backbone == "tiny_cnn"
    assert TrainConfig.model_validate_json((layout.model / "train_config.json").read_text()).epochs == 4
    # The killed run's scratch; the finished run removed its own (torch may keep caches of its own there).
    assert len(list(scratch.glob("bincounter-train-*"))) == 1


def test_an_unwritable_failure_file_still_exits_non_zero(tmp_path: Path, capsys) -> None:
    layout = make_layout(tmp_path, None)
    (tmp_path / "output").write_text("a file where the output folder should be")
    assert entry.run(layout) == 1
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'output'}" in err and "is not a folder" in err and "could not write" in err


# --------------------------------------------------------------------------- who may write /opt/ml


def _as_a_user_who_cannot_write(layout: entry.Layout) -> tuple[list[str], int, int]:
    """(command prefix, uid, gid) under which ``layout.model`` is not writable while the rest of
    the layout is: SageMaker's root-owned /opt/ml met by an image that runs as another user.

    Not root: the model folder loses its write bits. Root (root may write anywhere): the entry
    point runs as uid 65534 under setpriv, keeping only the capability to read and search every
    folder (so it finds this interpreter and the sources), and the model folder stays root's.
    """
    layout.model.mkdir()
    if os.geteuid() != 0:
        layout.model.chmod(0o555)
        return [], os.getuid(), os.getgid()
    prefix = [shutil.which("setpriv") or "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
              "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    try:
        subprocess.run([*prefix, "true"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"root, and setpriv cannot run a process as another user here: {exc}")
    layout.model.chmod(0o755)
    layout.root.chmod(0o777)  # output/ and checkpoints/ may be made by that user
    return prefix, 65534, 65534


def test_an_unwritable_model_folder_fails_at_once_naming_the_uid_and_the_fix(tmp_path: Path, data_dir: Path) -> None:
    layout = make_layout(tmp_path / "ml", data_dir)
    prefix, uid, gid = _as_a_user_who_cannot_write(layout)
    env = {**os.environ, entry.ROOT_ENV: str(layout.root), "PYTHONPATH": str(SRC)}
    t0 = time.monotonic()
    proc = subprocess.run([*prefix, sys.executable, "-m", "bincounter.sagemaker.entry", "train"], env=env,
                          capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-2000:]
    reason = layout.failure.read_text().splitlines()[0]
    assert reason.startswith(f"PermissionError: uid {uid} (gid {gid}) cannot write {layout.model} "), reason
    assert f"owned by uid {layout.model.stat().st_uid}" in reason
    assert "dockerfiles/Dockerfile.sagemaker" in reason  # the fix
    # At once: nothing was trained or checkpointed (the check comes before torch is even imported).
    assert "epoch=" not in proc.stdout and not any(layout.checkpoints.glob("*"))
    assert seconds < 60


# --------------------------------------------------------------------------- several instances

DIGEST = re.compile(r"rank (\d+)/(\d+) final model state sha256=([0-9a-f]{64})")


@pytest.mark.slow
def test_a_failing_worker_becomes_the_hosts_failure_reason(tmp_path: Path, data_dir: Path, monkeypatch) -> None:
    from bincounter_demo.s3server import free_port

    layout = make_layout(tmp_path, data_dir)
    (layout.channel() / "dataset.json").write_text("not JSON")  # there, so only the worker finds it broken
    monkeypatch.setenv("PYTHONPATH", str(SRC))
    monkeypatch.setenv(entry.MASTER_PORT_ENV, str(free_port()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(entry.WorkerFailed, match=r"^rank-0 on host localhost: JSONDecodeError: ") as failed:
        entry._train_distributed(layout, entry.Cluster(), nproc=1)
    assert "Traceback" in failed.value.detail
    assert not layout.model.exists()


@pytest.mark.slow
def test_two_hosts_train_as_one_world_and_only_the_first_writes(tmp_path: Path, data_dir: Path) -> None:
    from bincounter_demo.s3server import free_port

    hosts = ["127.0.0.1", "algo-2"]
    cfg = JOB_TRAIN.model_copy(update={"epochs": 2, "batch_size": 32})
    layouts = []
    for host in hosts:
        layout = make_layout(tmp_path / host / "ml", data_dir, cfg)
        layout.resource_config.write_text(json.dumps({"current_host": host, "hosts": hosts,
                                                      "network_interface_name": "lo"}))
        layouts.append(layout)
    port = free_port()
    procs = []
    for layout in layouts:
        scratch = layout.root.parent / "scratch"
        scratch.mkdir()
        procs.append(_start(layout, scratch, {entry.MASTER_PORT_ENV: str(port)}))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:  # a host left waiting for a peer that failed
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert [code for code, _, _ in results] == [0, 0], [err[-3000:] for _, _, err in results]

    # One world of two: each host ran one rank, and both ended with the same weights.
    found = [DIGEST.findall(err) for _, _, err in results]
    assert [[(int(r), int(w)) for r, w, _ in f] for f in found] == [[(0, 2)], [(1, 2)]]
    assert found[0][0][2] == found[1][0][2]
    # The first host alone reported, checkpointed and wrote the model; the second wrote nothing.
    first_out, second_out = results[0][1], results[1][1]
    assert [int(e) for e in re.findall(r"^epoch=(\d+) ", first_out, re.M)] == [1, 2]
    assert "best_val_accuracy=" in first_out
    assert "epoch=" not in second_out and "best_" not in second_out
    assert sorted(p.name for p in layouts[0].model.iterdir()) == sorted([*entry.MODEL_FILES, "train_config.json"])
    assert not layouts[1].model.exists() or not any(layouts[1].model.iterdir())
    assert _checkpoint_epoch(layouts[0]) == 1
    assert not any(layouts[1].checkpoints.iterdir())  # the same S3 prefix: one writer
    assert not layouts[0].failure.exists() and not layouts[1].failure.exists()
    history = json.loads((layouts[0].model / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
