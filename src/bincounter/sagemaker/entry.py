"""SageMaker's training contract: what ``docker run <image> train`` does in a training job.

SageMaker lays a job out under ``/opt/ml`` (settable here with ``$BINCOUNTER_SAGEMAKER_ROOT``,
so tests run the same code on a temporary folder):

    input/config/hyperparameters.json   every TrainConfig field we send, each value a string
    input/config/resourceconfig.json    the job's hosts and this one's name (current_host)
    input/data/training/                the "training" channel: one preprocess output
                                        (dataset.json and the train/val/test shards)
    checkpoints/                        synced with CheckpointConfig.S3Uri; restored before a
                                        spot-interrupted job restarts on a new instance
    model/                              tarred to <output>/<job>/output/model.tar.gz
    output/failure                      the job's FailureReason when we exit non-zero

The first thing checked is that this user can write ``model/``, ``output/`` and
``checkpoints/``: SageMaker mounts them for root, and an image running as another user would
otherwise fail only at the end of the training it paid for.

Training runs in a scratch folder; each epoch's checkpoint is mirrored to ``checkpoints/``
(``TrainConfig.checkpoint_uri``), so a rerun on a fresh machine resumes at the epoch it lost.
At the end the serving files (the same as a local training folder's, without the optimizer
state) are copied to ``model/``, so evaluate and register read an unpacked model.tar.gz
exactly like a local training output. Metrics are printed as ``name=value`` lines, which
``METRIC_DEFINITIONS`` (the job's MetricDefinitions) parse.

With several instances (or several GPUs) the training runs data-parallel: each host starts
``torch.distributed.run`` with its node rank (its place in ``hosts``), the first host as the
rendezvous address and one worker per GPU (one on CPU), and ``bincounter.training.train`` runs as DDP.
Only rank 0, on the first host, writes checkpoints and the model: every instance syncs its
``checkpoints/`` to the same S3 prefix, and SageMaker tars every instance's ``model/`` into one
archive, so any other writer would overwrite or clash. On a restart every rank resumes from the
checkpoint rank 0 finds. Each host writes its own failure reason.

Run as ``python -m bincounter.sagemaker.entry train``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path

from bincounter.config import TrainConfig

ROOT_ENV = "BINCOUNTER_SAGEMAKER_ROOT"
DEFAULT_ROOT = "/opt/ml"
DATA_CHANNEL = "training"
# Where the hosts' ranks meet, on the first host. Settable for a machine where the port is taken
# (the two-host test on loopback picks a free one).
MASTER_PORT_ENV = "BINCOUNTER_SAGEMAKER_MASTER_PORT"
DEFAULT_MASTER_PORT = 29500
# SageMaker: "Hostname information may not be immediately available... add a retry policy".
RESOLVE_SECONDS = 300.0
# Set by the launcher for its workers: the folder where a failing worker leaves its reason.
FAILURES_ENV = "BINCOUNTER_SAGEMAKER_FAILURES"
# The image variant that runs as root, for SageMaker's root-owned /opt/ml.
ROOT_IMAGE_HINT = ("build the root variant of the image for SageMaker (dockerfiles/Dockerfile.sagemaker, "
                   "see docs/images.md) and use it as training_image")
# What the model folder (and so model.tar.gz) holds: what Predictor.from_dir and register read,
# plus the training history and curves. Not checkpoint.pt: its optimizer state triples the size.
MODEL_FILES = ("model.pt", "model_spec.json", "history.json", "plots")
# SageMaker shows at most this much of output/failure as the job's FailureReason.
FAILURE_REASON_CHARS = 1024

_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
# The lines train() prints per epoch ("epoch=3 val_accuracy=0.8125 val_rmse=0.5 train_loss=0.7")
# and the summary line printed here. The word boundary keeps "val_accuracy" from matching inside
# "best_val_accuracy"; \b and plain groups, not look-behinds, because SageMaker does not say
# which regex engine reads the log.
METRIC_NAMES = ("epoch", "val_accuracy", "val_rmse", "train_loss", "best_epoch", "best_val_accuracy", "best_val_rmse")
METRIC_DEFINITIONS: tuple[dict[str, str], ...] = tuple(
    {"Name": name, "Regex": rf"\b{name}={_NUMBER}"} for name in METRIC_NAMES
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """The folders of a SageMaker training container, under one root."""

    root: Path

    @classmethod
    def from_env(cls) -> "Layout":
        return cls(Path(os.environ.get(ROOT_ENV, DEFAULT_ROOT)))

    @property
    def hyperparameters(self) -> Path:
        return self.root / "input" / "config" / "hyperparameters.json"

    @property
    def resource_config(self) -> Path:
        return self.root / "input" / "config" / "resourceconfig.json"

    def channel(self, name: str = DATA_CHANNEL) -> Path:
        return self.root / "input" / "data" / name

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def failure(self) -> Path:
        return self.root / "output" / "failure"


def to_hyperparameters(cfg: TrainConfig) -> dict[str, str]:
    """TrainConfig as SageMaker HyperParameters: every set field, every value a string.

    ``checkpoint_uri`` is left out: inside the job the checkpoint folder is fixed by the layout.
    """
    out: dict[str, str] = {}
    for key, value in cfg.model_dump(mode="json", exclude={"checkpoint_uri"}).items():
        if value is None:
            continue
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def parse_hyperparameters(values: dict[str, object]) -> TrainConfig:
    """TrainConfig from hyperparameters.json (strings, as SageMaker writes them).

    Pydantic's lax mode turns "8", "0.001" and "true" into the field's type; an unknown or
    invalid key is an error, not silently dropped.
    """
    if not isinstance(values, dict):
        raise ValueError(f"hyperparameters.json must hold a JSON object, not {type(values).__name__}")
    if "checkpoint_uri" in values:
        raise ValueError("checkpoint_uri is not a hyperparameter: a SageMaker job checkpoints to its checkpoint folder")
    values = dict(values)
    for key, value in values.items():  # lists travel as JSON text (to_hyperparameters)
        field = TrainConfig.model_fields.get(key)
        if field is not None and isinstance(value, str) and typing.get_origin(field.annotation) in (tuple, list):
            try:
                values[key] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"hyperparameter {key} must be a JSON list, not {value[:80]!r}") from exc
    return TrainConfig.model_validate(values)


def read_config(layout: Layout) -> TrainConfig:
    """The job's TrainConfig, checkpointing to the layout's checkpoint folder."""
    path = layout.hyperparameters
    values = json.loads(path.read_text()) if path.exists() else {}
    cfg = parse_hyperparameters(values)
    return cfg.model_copy(update={"checkpoint_uri": str(layout.checkpoints)})


class WorkerFailed(RuntimeError):
    """A training worker under torch.distributed.run failed; ``detail`` is its traceback."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class Cluster:
    """The job's instances as resourceconfig.json lists them (one host when it is absent)."""

    hosts: tuple[str, ...] = ("localhost",)
    current_host: str = "localhost"
    network_interface: str | None = None

    @property
    def nnodes(self) -> int:
        return len(self.hosts)

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def master(self) -> str:
        """The rendezvous address: the first host (every host reads the same sorted list)."""
        return self.hosts[0] if self.nnodes > 1 else "127.0.0.1"


def read_cluster(layout: Layout) -> Cluster:
    """This job's hosts from ``resourceconfig.json``; a clear error when it makes no sense."""
    path = layout.resource_config
    if not path.exists():
        return Cluster()
    values = json.loads(path.read_text())
    hosts, current = values.get("hosts"), values.get("current_host")
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
        raise ValueError(f"{path}: 'hosts' must be a non-empty list of host names, got {hosts!r}")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"{path}: 'hosts' names a host twice: {hosts}")
    if current not in hosts:
        raise ValueError(f"{path}: current_host {current!r} is not one of the hosts {hosts}")
    return Cluster(tuple(hosts), current, values.get("network_interface_name") or None)


def processes_per_host(cfg: TrainConfig) -> int:
    """One worker per GPU when the device is left to choose ('auto'); one otherwise (CPU, or a
    device named in the hyperparameters): the rule a pipeline's train task follows too."""
    from bincounter.training.train import processes_per_node  # torch loads on the training host only

    return processes_per_node(cfg)


def launcher_command(cluster: Cluster, nproc: int, port: int) -> list[str]:
    """``torch.distributed.run`` (torchrun) for this host: static rendezvous at the first host,
    no restarts (a failed rank fails the job; SageMaker's spot restart resumes it)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={cluster.nnodes}",
            f"--node-rank={cluster.node_rank}", f"--nproc-per-node={nproc}", "--rdzv-backend=static",
            f"--master-addr={cluster.master}", f"--master-port={port}", "--max-restarts=0",
            "-m", "bincounter.sagemaker.entry", "worker"]


def wait_for_host(name: str, timeout: float = RESOLVE_SECONDS, poll: float = 2.0) -> None:
    """Return once ``name`` resolves; SageMaker may publish the hosts' names after they start."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.getaddrinfo(name, None)
            return
        except socket.gaierror as exc:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"host {name!r}, where the ranks meet, did not resolve within {timeout:.0f} s: "
                                   f"{exc}") from exc
            time.sleep(poll)


def _owner(path: Path) -> str:
    """Who owns ``path`` (or the nearest folder above it, where it would be made)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    st = existing.stat()
    where = "" if existing == path else f"{existing}, where it would be made, is "
    return f"{where}owned by uid {st.st_uid}, gid {st.st_gid}, mode {st.st_mode & 0o7777:o}"


def check_writable(layout: Layout) -> None:
    """Fail at once unless this user can write the model, output and checkpoint folders.

    Each is probed by creating a file in it (or, while it does not exist yet, in the nearest
    folder above it, where it would be made): the one test that also holds for root, ACLs and
    read-only mounts. Nothing is left behind.
    """
    for folder in (layout.model, layout.failure.parent, layout.checkpoints):
        target = next(p for p in (folder, *folder.parents) if p.exists())
        try:
            if not target.is_dir():
                raise NotADirectoryError(f"{target} exists and is not a folder")
            fd, probe = tempfile.mkstemp(dir=target, prefix=".bincounter-write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            uid, gid = os.getuid(), os.getgid()
            fix = (ROOT_IMAGE_HINT if uid != 0 else
                   "this process runs as root and still cannot write there: check how the folder is mounted")
            raise PermissionError(
                f"uid {uid} (gid {gid}) cannot write {folder} ({_owner(folder)}): {exc.strerror or exc}. "
                f"SageMaker mounts {DEFAULT_ROOT}'s folders for root, so a training image must run as root there: "
                f"{fix}") from exc


def _publish_model(work: Path, model_dir: Path, cfg: TrainConfig) -> None:
    """Copy the serving files into the folder SageMaker tars as model.tar.gz."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        src = work / name
        if src.is_dir():
            shutil.copytree(src, model_dir / name, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, model_dir / name)
    (model_dir / "train_config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))


def _train_and_publish(layout: Layout, cfg: TrainConfig, publish: bool) -> None:
    """Train on the channel in a fresh scratch folder; with ``publish``, copy the model out and
    print the summary line."""
    from bincounter.training.train import train

    # A fresh scratch folder each start, like the new instance a spot restart lands on: the
    # only way back into an interrupted run is the checkpoint folder.
    with tempfile.TemporaryDirectory(prefix="bincounter-train-") as work:
        result = train(cfg, layout.channel(), work)
        if publish:
            _publish_model(Path(work), layout.model, cfg)
    if publish:
        print(f"best_epoch={result.best_epoch} best_val_accuracy={result.best.get('val_accuracy', 0.0):.4f} "
              f"best_val_rmse={result.best.get('val_rmse', 0.0):.4f}", flush=True)


def _train_distributed(layout: Layout, cluster: Cluster, nproc: int) -> None:
    """This host's share of a data-parallel job: ``nproc`` workers under torch.distributed.run.
    Raises WorkerFailed with the first failing worker's reason."""
    if cluster.nnodes > 1:
        wait_for_host(cluster.master)
    port = int(os.environ.get(MASTER_PORT_ENV, DEFAULT_MASTER_PORT))
    log.info("host %s: node %d of %d, %d worker(s); ranks meet at %s:%d", cluster.current_host,
             cluster.node_rank, cluster.nnodes, nproc, cluster.master, port)
    with tempfile.TemporaryDirectory(prefix="bincounter-failures-") as failures:
        env = {**os.environ, ROOT_ENV: str(layout.root), FAILURES_ENV: failures}
        if cluster.network_interface:  # the interface SageMaker gives the job for traffic between hosts
            env.setdefault("GLOO_SOCKET_IFNAME", cluster.network_interface)
            env.setdefault("NCCL_SOCKET_IFNAME", cluster.network_interface)
        code = subprocess.call(launcher_command(cluster, nproc, port), env=env)
        if code == 0:
            return
        reports = sorted(Path(failures).glob("rank-*"), key=lambda p: p.stat().st_mtime)
        if not reports:
            raise WorkerFailed(f"torch.distributed.run exited {code} on host {cluster.current_host} (node "
                               f"{cluster.node_rank} of {cluster.nnodes}) before a worker reported why: see the log")
        first = reports[0]  # the earliest is the cause; the others usually lost their peer
        reason, _, detail = first.read_text().partition("\n\n")
        raise WorkerFailed(f"{first.name} on host {cluster.current_host}: {reason}", detail)


def _fail(layout: Layout, reason: str, detail: str) -> None:
    """Write the job's FailureReason (SageMaker shows its first 1024 characters)."""
    print(detail, file=sys.stderr, flush=True)  # the job's log has it even if the file cannot be written
    try:
        layout.failure.parent.mkdir(parents=True, exist_ok=True)
        layout.failure.write_text(reason[:FAILURE_REASON_CHARS] + "\n\n" + detail)
    except OSError as write_error:  # e.g. a non-root image user on SageMaker's root-owned /opt/ml
        print(f"could not write {layout.failure}: {write_error}", file=sys.stderr, flush=True)


def run(layout: Layout) -> int:
    """Train once under ``layout``; 0 on success, 1 after writing the failure reason."""
    try:
        check_writable(layout)
        cfg = read_config(layout)
        cluster = read_cluster(layout)
        data = layout.channel()
        if not (data / "dataset.json").exists():
            raise FileNotFoundError(f"input channel {DATA_CHANNEL!r} ({data}) holds no dataset.json: point it at a "
                                    "preprocess output (s3://<bucket>/<prefix> with dataset.json and the shards)")
        layout.checkpoints.mkdir(parents=True, exist_ok=True)
        nproc = processes_per_host(cfg)
        if cluster.nnodes * nproc > 1:
            _train_distributed(layout, cluster, nproc)
        else:
            _train_and_publish(layout, cfg, publish=True)
        return 0
    except Exception as exc:  # every failure becomes the job's FailureReason
        _fail(layout, f"{type(exc).__name__}: {exc}", getattr(exc, "detail", "") or traceback.format_exc())
        return 1


def run_worker(layout: Layout) -> int:
    """One rank under torch.distributed.run (started by ``run``); rank 0 publishes the model."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        _train_and_publish(layout, read_config(layout), publish=rank == 0)
        return 0
    except Exception as exc:
        detail = traceback.format_exc()
        print(detail, file=sys.stderr, flush=True)
        failures = os.environ.get(FAILURES_ENV)
        if failures:  # the launcher on this host turns the earliest report into the failure reason
            from bincounter.fileio import atomic_write

            atomic_write(Path(failures) / f"rank-{rank}", f"{type(exc).__name__}: {exc}\n\n{detail}".encode())
        return 1


def main(argv: list[str] | None = None) -> int:
    """``train`` (SageMaker's container argument) or no argument: run the training contract.
    ``worker`` is what the launcher starts under torch.distributed.run."""
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["train"], ["worker"]):
        print(f"usage: python -m bincounter.sagemaker.entry [train]  (got {' '.join(args)!r})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return (run_worker if args == ["worker"] else run)(Layout.from_env())


if __name__ == "__main__":
    sys.exit(main())
