"""The checkpoint mirror: what a restarted job on a new machine resumes from."""

from __future__ import annotations

import pytest

from bincounter.training.checkpoints import RESTORING, CheckpointMirror


@pytest.fixture
def s3(monkeypatch):
    from bincounter_demo.s3server import LocalS3

    with LocalS3() as server:
        for key, value in {"AWS_ENDPOINT_URL_S3": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        server.client().create_bucket(Bucket="ckpt")
        yield server


class _DropsTheLine:
    """An S3 client whose first download of one key breaks off, like a killed or cut connection."""

    def __init__(self, client, key: str):
        self._client, self._key, self.broke = client, key, False

    def get_object(self, **kwargs):
        if kwargs["Key"] == self._key and not self.broke:
            self.broke = True
            raise ConnectionResetError(f"connection reset while reading {self._key}")
        return self._client.get_object(**kwargs)


def test_a_restore_broken_off_halfway_leaves_no_checkpoint_and_the_next_one_gets_all(s3, tmp_path):
    node_a = tmp_path / "node-a"
    node_a.mkdir()
    files = {"checkpoint.pt": b"epoch 3 state", "model.pt": b"best weights", "mlflow_run_id": b"run-of-node-a"}
    for name, data in files.items():
        (node_a / name).write_bytes(data)
    CheckpointMirror("s3://ckpt/job/1").push(node_a)

    node_b = tmp_path / "node-b"
    mirror = CheckpointMirror("s3://ckpt/job/1")
    mirror._client = _DropsTheLine(s3.client(), "job/1/model.pt")
    with pytest.raises(ConnectionResetError):
        mirror.restore(node_b)
    assert mirror._client.broke
    # No checkpoint without its weights: the next start must restore again, not resume half-restored.
    assert not (node_b / "checkpoint.pt").exists() and not (node_b / RESTORING).exists()

    assert mirror.restore(node_b) is True
    assert (node_b / "checkpoint.pt").read_bytes() == files["checkpoint.pt"]
    assert (node_b / "model.pt").read_bytes() == files["model.pt"]
    assert sorted(p.name for p in node_b.iterdir()) == ["checkpoint.pt", "model.pt"]


def test_restoring_never_overwrites_the_new_runs_id(tmp_path):
    """A restart on a new machine is a new MLflow run: its id, written before training starts,
    is the one a later registration reads, so the mirror must not bring back the old one."""
    shared, old, new = tmp_path / "shared", tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    (old / "checkpoint.pt").write_bytes(b"state")
    (old / "mlflow_run_id").write_text("old-run")
    CheckpointMirror(str(shared)).push(old)
    (new / "mlflow_run_id").write_text("new-run")
    assert CheckpointMirror(str(shared)).restore(new) is True
    assert (new / "mlflow_run_id").read_text() == "new-run"
