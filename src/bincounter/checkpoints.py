"""Mirror training checkpoints to S3 (or another folder), so a job restarted on a new machine
(spot interruption, preempted pod) resumes from the last epoch instead of from scratch."""

from __future__ import annotations

import shutil
from pathlib import Path

from bincounter.fileio import atomic_write

MIRRORED = ("checkpoint.pt", "model.pt", "mlflow_run_id")


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
        """Fetch the mirrored files when ``local_dir`` has no checkpoint; True if one arrived."""
        if not self.uri or (local_dir / "checkpoint.pt").exists():
            return False
        local_dir.mkdir(parents=True, exist_ok=True)
        for name in MIRRORED:
            if self.uri.startswith("s3://"):
                from botocore.exceptions import ClientError

                client, bucket, prefix = self._s3()
                try:
                    data = client.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                        continue
                    raise
                atomic_write(local_dir / name, data)
            elif (Path(self.uri) / name).exists():
                shutil.copyfile(Path(self.uri) / name, local_dir / name)
        return (local_dir / "checkpoint.pt").exists()
