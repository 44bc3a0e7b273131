"""Mirror training checkpoints to S3 (or another folder), so a job restarted on a new machine
(spot interruption, preempted pod) resumes from the last epoch instead of from scratch."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bincounter.fileio import atomic_write

# checkpoint.pt last: it is what says "resume from here", so it is pushed (and restored) only
# after the weights it refers to. The MLflow run id is not mirrored: a restart on a new machine
# is a new run, and its id (written by the launcher) is the one a later registration must use.
MIRRORED = ("model.pt", "checkpoint.pt")
RESTORING = ".restoring"  # where restore gathers the files before moving any into place


class CheckpointMirror:
    """``push`` after every checkpoint; ``restore`` before looking for one locally."""

    def __init__(self, uri: str | None):
        self.uri = uri.rstrip("/") if uri else None
        self._client = None

    def _s3(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3")  # endpoint and credentials from the usual AWS_* settings
        bucket, _, prefix = self.uri[len("s3://"):].partition("/")
        return self._client, bucket, (prefix + "/" if prefix else "")

    def push(self, local_dir: Path) -> None:
        if not self.uri:
            return
        for name in MIRRORED:
            path = local_dir / name
            if not path.exists():
                continue
            if self.uri.startswith("s3://"):
                client, bucket, prefix = self._s3()
                client.upload_file(str(path), bucket, prefix + name)  # S3 puts are atomic per object
            else:
                atomic_write(Path(self.uri) / name, path.read_bytes())

    def restore(self, local_dir: Path) -> bool:
        """Fetch the mirrored files when ``local_dir`` has no checkpoint; True if one arrived.

        All of them are fetched into a temporary folder first, then moved into place with the
        checkpoint last: a restore that fails or is killed halfway leaves no checkpoint, so the
        next start restores again instead of resuming with weights missing.
        """
        if not self.uri:
            return False
        staging = local_dir / RESTORING
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed restore
        if (local_dir / "checkpoint.pt").exists():
            return False
        staging.mkdir(parents=True)
        try:
            fetched = [name for name in MIRRORED if self._fetch(name, staging / name)]
            if "checkpoint.pt" not in fetched:
                return False
            for name in fetched:  # MIRRORED order: checkpoint.pt last
                os.replace(staging / name, local_dir / name)
            return True
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _fetch(self, name: str, dest: Path) -> bool:
        """Copy one mirrored file to ``dest``; False when the mirror does not have it."""
        if self.uri.startswith("s3://"):
            from botocore.exceptions import ClientError

            client, bucket, prefix = self._s3()
            try:
                data = client.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return False
                raise
            dest.write_bytes(data)
            return True
        source = Path(self.uri) / name
        if not source.exists():
            return False
        shutil.copyfile(source, dest)
        return True
