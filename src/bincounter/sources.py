"""Read a dataset in the bucket's layout from S3 (any endpoint) or a local folder.

Layout: ``<root>/bin-images/<id>.jpg`` and ``<root>/metadata/<id>.json``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from bincounter.config import SourceConfig

IMAGES = "bin-images"
METADATA = "metadata"


class SourceError(RuntimeError):
    """The source cannot be reached or read; the message says which and why."""


class ObjectMissing(SourceError):
    """One object does not exist at the source."""


class Source(Protocol):
    def iter_ids(self) -> Iterator[str]: ...
    def key(self, kind: str, id_: str) -> str: ...
    def read(self, key: str) -> bytes: ...
    def check(self) -> None: ...


def _stem(name: str, suffix: str) -> str | None:
    base = name.rsplit("/", 1)[-1]
    return base[: -len(suffix)] if base.endswith(suffix) and len(base) > len(suffix) else None


class LocalSource:
    """A folder in the bucket's layout."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def check(self) -> None:
        if not (self.root / METADATA).is_dir():
            raise SourceError(f"{self.root} has no '{METADATA}/' folder: not in the bucket's layout")

    def iter_ids(self) -> Iterator[str]:
        # Sorted like an S3 listing, so "the first N ids" means the same on both sources.
        for name in sorted(os.listdir(self.root / METADATA)):
            stem = _stem(name, ".json")
            if stem is not None:
                yield stem

    def key(self, kind: str, id_: str) -> str:
        return f"{IMAGES}/{id_}.jpg" if kind == IMAGES else f"{METADATA}/{id_}.json"

    def read(self, key: str) -> bytes:
        path = self.root / key
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{path} does not exist") from exc

    def describe(self, key: str) -> str:
        return str(self.root / key)


class S3Source:
    """A bucket (and optional prefix) on AWS S3 or any S3-compatible endpoint."""

    def __init__(self, cfg: SourceConfig, *, workers: int = 32, retries: int = 8,
                 connect_timeout: float = 5.0, read_timeout: float = 30.0):
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        without_scheme = cfg.uri[len("s3://"):]
        self.bucket, _, prefix = without_scheme.partition("/")
        if not self.bucket:
            raise ValueError(f"no bucket in {cfg.uri!r}")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = cfg.endpoint_url or "AWS S3"
        # botocore's "standard" retry mode backs off exponentially with jitter on throttling,
        # 5xx and connection errors; one retry policy, not two stacked.
        config = Config(
            signature_version=UNSIGNED if (cfg.anonymous and not cfg.profile) else None,
            retries={"max_attempts": retries + 1, "mode": "standard"},
            max_pool_connections=max(10, workers),
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        session = boto3.session.Session(profile_name=cfg.profile, region_name=cfg.region)
        self.client = session.client("s3", endpoint_url=cfg.endpoint_url, config=config)

    def _fail(self, what: str, exc: Exception) -> SourceError:
        return SourceError(f"cannot {what} s3://{self.bucket}/{self.prefix} at {self.endpoint}: {exc}")

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}{METADATA}/", MaxKeys=1)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("list", exc) from exc

    def iter_ids(self) -> Iterator[str]:
        """Stream ids page by page (1,000 keys each); the full listing is never held."""
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}{METADATA}/"):
                for obj in page.get("Contents", []):
                    stem = _stem(obj["Key"], ".json")
                    if stem is not None:
                        yield stem
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("list", exc) from exc

    def key(self, kind: str, id_: str) -> str:
        name = f"{IMAGES}/{id_}.jpg" if kind == IMAGES else f"{METADATA}/{id_}.json"
        return f"{self.prefix}{name}"

    def read(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectMissing(f"s3://{self.bucket}/{key} does not exist") from exc
            raise self._fail(f"read {key} from", exc) from exc
        except BotoCoreError as exc:
            raise self._fail(f"read {key} from", exc) from exc

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def open_source(cfg: SourceConfig, **s3_options) -> LocalSource | S3Source:
    """The source named by ``cfg.uri``: ``s3://...`` or a local folder."""
    if cfg.is_s3:
        return S3Source(cfg, **s3_options)
    path = Path(cfg.uri.removeprefix("file://"))
    return LocalSource(path)

