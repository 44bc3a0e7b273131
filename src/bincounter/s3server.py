"""A local S3-compatible endpoint (moto's server mode) on loopback, for demos and tests."""

from __future__ import annotations

import json
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bincounter.sources import IMAGES, METADATA


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalS3:
    """``with LocalS3() as s3: s3.upload_folder(...)``; stopped on exit, also after errors."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port or free_port(host)
        self.endpoint = f"http://{host}:{self.port}"
        self._server = None

    def __enter__(self) -> "LocalS3":
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self):
        import boto3

        # moto accepts any credentials; these never leave the machine.
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def upload_folder(self, folder: str | Path, bucket: str, prefix: str = "", workers: int = 16) -> int:
        """Create ``bucket`` holding ``folder``'s ``bin-images/`` and ``metadata/`` as they are."""
        folder = Path(folder)
        client = self.client()
        client.create_bucket(Bucket=bucket, ACL="public-read")
        # Like the real aft-vbi-pds: anyone may list and read, without signing requests.
        client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
                           "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}],
        }))
        files = [p for sub in (IMAGES, METADATA) if (folder / sub).is_dir() for p in sorted((folder / sub).iterdir())]

        def put(path: Path) -> None:
            key = f"{prefix.strip('/') + '/' if prefix.strip('/') else ''}{path.parent.name}/{path.name}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), ACL="public-read")

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(put, files))
        return len(files)
