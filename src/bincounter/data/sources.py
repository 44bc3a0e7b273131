"""Read a dataset in the bucket's layout from S3 (any endpoint) or a local folder.

Layout: ``<root>/bin-images/<id>.jpg`` and ``<root>/metadata/<id>.json``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from bincounter.config import SourceConfig
from bincounter.data.bounded import TooLarge, read_file
from bincounter.ids import check_id, is_dataset_id

log = logging.getLogger(__name__)

IMAGES = "bin-images"
METADATA = "metadata"


class SourceError(RuntimeError):
    """The source cannot be reached or read; the message says which and why."""


class ObjectMissing(SourceError):
    """One object does not exist at the source."""


class Source(Protocol):
    def iter_ids(self) -> Iterator[str]: ...
    def key(self, kind: str, id_: str) -> str: ...
    # ObjectMissing, SourceError, or bounded.Refused for one object that must not be read.
    def read(self, key: str, max_bytes: int | None = None) -> bytes: ...
    def check(self) -> None: ...


def _stem(name: str, suffix: str) -> str | None:
    base = name.rsplit("/", 1)[-1]
    return base[: -len(suffix)] if base.endswith(suffix) and len(base) > len(suffix) else None


def _listed_id(name: str, where: str) -> str | None:
    """The dataset id a listed metadata name stands for; None (with a warning naming it) for
    anything else in the folder, which is not part of the dataset and never becomes a path."""
    stem = _stem(name, ".json")
    if stem is None:
        return None
    if not is_dataset_id(stem):
        log.warning("skipped %s in %s: %r is not a dataset id (digits)", name, where, stem)
        return None
    return stem


def _key(kind: str, id_: str) -> str:
    check_id(id_)  # the last gate before an id names an object or a file
    return f"{IMAGES}/{id_}.jpg" if kind == IMAGES else f"{METADATA}/{id_}.json"


class LocalSource:
    """A folder in the bucket's layout. Nothing outside it is read, whatever its entries are:
    a symlink out of the folder, a FIFO or a device is refused (bounded.Refused) unread."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def check(self) -> None:
        if not (self.root / METADATA).is_dir():
            raise SourceError(f"{self.root} has no '{METADATA}/' folder: not in the bucket's layout")

    def iter_ids(self) -> Iterator[str]:
        # Sorted like an S3 listing, so "the first N ids" means the same on both sources.
        for name in sorted(os.listdir(self.root / METADATA)):
            stem = _listed_id(name, str(self.root / METADATA))
            if stem is not None:
                yield stem

    def key(self, kind: str, id_: str) -> str:
        return _key(kind, id_)

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        path = self.root / key
        try:
            return read_file(path, root=self.root, max_bytes=max_bytes)
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{path} does not exist") from exc

    def describe(self, key: str) -> str:
        return str(self.root / key)


# Backoff, in seconds: full jitter over base * 2**attempt, capped. Throttling (503 SlowDown)
# starts slower: S3 asks for less traffic, and a fast retry is more traffic.
BACKOFF_BASE = 0.1
THROTTLE_BACKOFF_BASE = 0.5
MAX_BACKOFF = 20.0
_THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                             "TooManyRequestsException", "ProvisionedThroughputExceededException",
                             "RequestThrottled", "BandwidthLimitExceeded", "EC2ThrottledException"})
_TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException",
                              "PriorRequestNotComplete"})
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def _retry_kind(exc: Exception) -> str | None:
    """"throttle" or "transient" when ``exc`` is worth retrying, else None."""
    from botocore.exceptions import (ClientError, ConnectionError, HTTPClientError, IncompleteReadError,
                                     ResponseStreamingError)

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if err.get("Code") in _THROTTLE_CODES or status == 429:
            return "throttle"
        if err.get("Code") in _TRANSIENT_CODES or status >= 500:
            return "transient"
        return None
    # Connection refused/reset/timed out, or a body cut off mid-transfer (which botocore's
    # own retries never see: it happens after the call has returned).
    if isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError)):
        return "transient"
    return None


class S3Source:
    """A bucket (and optional prefix) on AWS S3 or any S3-compatible endpoint.

    Retries are ours, not botocore's: its "standard" mode shares a retry quota per client
    (about 35 retries of 5xx errors) and, once that is spent, fails every request at once
    without backing off, so a few seconds of S3 errors would fail thousands of objects;
    and it never retries a body that breaks off after the headers arrived. Here every
    request, body included, gets ``retries`` retries with exponential backoff and jitter.

    Anonymous object reads skip botocore: an unsigned GET is a plain HTTP GET, and
    botocore spends about 3 ms of CPU building and parsing each one (2.5x what urllib3
    needs), which caps a download at a few hundred objects per second and core.
    Listings, and everything signed, go through boto3.
    """

    page_size = 1000  # keys per listing request (S3's maximum)

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
        self.anonymous = cfg.anonymous and not cfg.profile
        self.retries = retries
        self.retried = 0  # retries done so far, all threads (read by ingest's result)
        self._lock = threading.Lock()
        config = Config(
            signature_version=UNSIGNED if self.anonymous else None,
            retries={"total_max_attempts": 1},  # see the class docstring
            max_pool_connections=max(10, workers),
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        session = boto3.session.Session(profile_name=cfg.profile, region_name=cfg.region)
        self.client = session.client("s3", endpoint_url=cfg.endpoint_url, config=config)
        self._http = None
        if self.anonymous:
            import urllib3

            # One host serves every object: a single connection pool, addressed by path.
            base = urllib.parse.urlsplit(_object_url_base(self.bucket, self.client.meta.endpoint_url))
            self._http = urllib3.connection_from_url(
                f"{base.scheme}://{base.netloc}", maxsize=max(10, workers), block=False,
                retries=False,  # retried by _call, like everything else
                timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout))
            self._object_path = base.path

    def _fail(self, what: str, exc: Exception) -> SourceError:
        hint = ""
        if "AccessDenied" in str(exc) and self.anonymous:
            hint = " (unsigned request: a private bucket needs a profile or anonymous=False)"
        return SourceError(f"cannot {what} s3://{self.bucket}/{self.prefix} at {self.endpoint}: {exc}{hint}")

    def _call(self, what: str, fn, retries: int | None = None):
        """``fn()`` with retries on throttling, 5xx and broken connections; SourceError after."""
        from botocore.exceptions import BotoCoreError, ClientError

        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return fn()
            except (BotoCoreError, ClientError) as exc:
                code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
                if code in _MISSING_CODES:
                    raise ObjectMissing(f"{what}: does not exist") from exc
                kind = _retry_kind(exc)
                if kind is None or attempt == retries:
                    raise self._fail(what, exc) from exc
            base = THROTTLE_BACKOFF_BASE if kind == "throttle" else BACKOFF_BASE
            with self._lock:
                self.retried += 1
            time.sleep(random.random() * min(MAX_BACKOFF, base * 2**attempt))
        raise AssertionError("unreachable")

    def call(self, what: str, fn, retries: int | None = None):
        """``fn()`` (a request of this client's) with this source's retries; SourceError after,
        ObjectMissing for a key that does not exist."""
        return self._call(what, fn, retries)

    def check(self) -> None:
        """List one key, so a wrong endpoint or bucket fails now, naming both.

        Few retries: a misconfiguration should not wait out the whole backoff schedule.
        """
        self._call("list", lambda: self.client.list_objects_v2(
            Bucket=self.bucket, Prefix=f"{self.prefix}{METADATA}/", MaxKeys=1), retries=min(self.retries, 2))

    def iter_ids(self) -> Iterator[str]:
        """Stream ids page by page (1,000 keys each); the full listing is never held.

        Pages are requested one by one (not through a paginator) so each is retried alone.
        """
        kwargs = {"Bucket": self.bucket, "Prefix": f"{self.prefix}{METADATA}/", "MaxKeys": self.page_size}
        while True:
            page = self._call("list", lambda: self.client.list_objects_v2(**kwargs))
            for obj in page.get("Contents", []):
                stem = _listed_id(obj["Key"], f"s3://{self.bucket}/{self.prefix}{METADATA}/")
                if stem is not None:
                    yield stem
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def key(self, kind: str, id_: str) -> str:
        return f"{self.prefix}{_key(kind, id_)}"

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; with ``max_bytes``, a larger object is refused (TooLarge) from its
        Content-Length, before its body is read."""
        # The body is read inside the retried call: a transfer cut short is fetched again.
        def get() -> bytes:
            if self._http is not None:
                return self._get_unsigned(key, max_bytes)
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
            if max_bytes is not None and answer["ContentLength"] > max_bytes:
                answer["Body"].close()
                raise _too_large(key, answer["ContentLength"], max_bytes)
            return answer["Body"].read()

        try:
            return self._call(f"read {key} from", get)
        except ObjectMissing as exc:
            raise ObjectMissing(f"s3://{self.bucket}/{key} does not exist") from exc.__cause__

    def _get_unsigned(self, key: str, max_bytes: int | None = None) -> bytes:
        """GET one object over plain HTTP; failures raise as botocore's would, for ``_call``."""
        import urllib3
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

        path = self._object_path + urllib.parse.quote(key, safe="/~")
        try:
            # urllib3 checks the body against Content-Length: a cut transfer raises here.
            resp = self._http.urlopen("GET", path, preload_content=False)
            size = int(resp.headers.get("Content-Length") or 0)
            if resp.status == 200 and max_bytes is not None and size > max_bytes:
                resp.close()  # the connection goes too: the body is never read
                resp.release_conn()
                raise _too_large(key, size, max_bytes)
            data = resp.data  # reads the body and gives the connection back to the pool
        except urllib3.exceptions.NewConnectionError as exc:
            raise ConnectionError(error=exc) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise HTTPClientError(error=exc) from exc
        if resp.status == 200:
            return data
        body = data.decode("utf-8", "replace")
        code = _xml_field(body, "Code") or str(resp.status)
        error = {"Code": code, "Message": _xml_field(body, "Message") or body[:200]}
        raise ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": resp.status}}, "GetObject")

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def _too_large(key: str, size: int, max_bytes: int) -> TooLarge:
    return TooLarge(f"{key}: {size} bytes, over the limit of {max_bytes}")


def _object_url_base(bucket: str, endpoint: str) -> str:
    """Where ``bucket``'s objects are, given the endpoint boto3 resolved (so AWS_ENDPOINT_URL
    and profile settings apply to both request paths): virtual-hosted on AWS, where
    path-style is deprecated, unless the name's dots would break TLS; path-style elsewhere,
    as botocore addresses MinIO or moto."""
    parts = urllib.parse.urlsplit(endpoint)
    if parts.hostname and parts.hostname.endswith("amazonaws.com") and "." not in bucket:
        return f"{parts.scheme}://{bucket}.{parts.netloc}/"
    return f"{endpoint.rstrip('/')}/{bucket}/"


def _xml_field(body: str, name: str) -> str | None:
    match = re.search(f"<{name}>(.*?)</{name}>", body, re.S)
    return match.group(1) if match else None


def open_source(cfg: SourceConfig, **s3_options) -> LocalSource | S3Source:
    """The source named by ``cfg.uri``: ``s3://...`` or a local folder."""
    if cfg.is_s3:
        return S3Source(cfg, **s3_options)
    path = Path(cfg.uri.removeprefix("file://"))
    return LocalSource(path)

