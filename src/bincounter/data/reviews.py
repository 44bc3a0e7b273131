"""People's counts of bins, kept like data: ``reviews/<id>.json`` beside ``metadata/``.

One file per bin, ``{"id": "00523", "answers": [...]}``, each answer saying who counted, when,
what (a count, or null for "can't tell"), on which photo (its sha256) and for which model version
(the one whose doubt put the bin in the queue). Answers are only ever appended: a second
person's answer that disagrees is kept beside the first, and :func:`settle` decides what a bin's
answers add up to.

Writes never lose an answer. In a folder, a per-bin lock serialises the read-append-write and
the file is replaced atomically (a killed writer leaves the old file whole). On S3 there is no
lock: each write is conditional on the object being the one read (``If-Match`` on its ETag, or
``If-None-Match: *`` for the first answer), and a writer that lost the race reads again and
retries, so two reviewers answering the same bin at once both land.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from bincounter.config import MAX_JSON_DEPTH, SourceConfig
from bincounter.data import bounded
from bincounter.data.sources import S3Source
from bincounter.fileio import atomic_write
from bincounter.ids import check_id, is_dataset_id

REVIEWS = "reviews"
# Where a label came from, in ingest's manifest, preprocess's index and each sample's JSON: a
# person's count (a settled review) or the record's EXPECTED_QUANTITY.
LABEL_SOURCE = "label_source"
FROM_REVIEW, FROM_METADATA = "review", "metadata"
MAX_REVIEW_BYTES = 2**20
REVIEWER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODEL = re.compile(r"[\x20-\x7e]{0,200}")  # printable ASCII: it is shown and logged
_RACES = 30  # conditional writes lost in a row before giving up


class InvalidReview(ValueError):
    """A reviews file, or one answer, that is not what this module writes; the message says why."""


class WriteConflict(RuntimeError):
    """Other writers kept changing the bin's file: the answer was not stored (nothing was lost)."""


@dataclass(frozen=True)
class Answer:
    """One person's answer for one bin's photo."""

    reviewer: str
    at: str  # ISO 8601, UTC
    photo_sha256: str
    count: int | None  # None: the person could not tell
    model: str = ""  # the model version whose doubt queued the bin
    answer_id: str = ""

    @classmethod
    def new(cls, reviewer: str, count: int | None, photo_sha256: str, model: str = "") -> "Answer":
        answer = cls(reviewer=reviewer, at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                     photo_sha256=photo_sha256, count=count, model=model, answer_id=uuid.uuid4().hex)
        return answer.checked()

    def checked(self, max_count: int = 10**6) -> "Answer":
        """This answer, or InvalidReview naming the field that is wrong."""
        if not isinstance(self.reviewer, str) or not REVIEWER.fullmatch(self.reviewer):
            raise InvalidReview(f"reviewer {str(self.reviewer)[:80]!r} is not a reviewer's name")
        if not isinstance(self.photo_sha256, str) or not _SHA256.fullmatch(self.photo_sha256):
            raise InvalidReview(f"photo_sha256 {str(self.photo_sha256)[:80]!r} is not a sha256")
        if self.count is not None and (type(self.count) is not int or not 0 <= self.count <= max_count):
            raise InvalidReview(f"count {str(self.count)[:40]!r} is not a count of 0 to {max_count}")
        if not isinstance(self.model, str) or not _MODEL.fullmatch(self.model):
            raise InvalidReview(f"model {str(self.model)[:80]!r} is not a model version")
        if not isinstance(self.answer_id, str) or len(self.answer_id) > 64:
            raise InvalidReview("answer_id is not a short string")
        try:
            when = datetime.fromisoformat(self.at)
        except (TypeError, ValueError):
            raise InvalidReview(f"at {str(self.at)[:40]!r} is not an ISO 8601 time") from None
        if when.tzinfo is None:
            raise InvalidReview(f"at {self.at!r} has no time zone")
        return self

    @classmethod
    def from_dict(cls, d: object, max_count: int = 10**6) -> "Answer":
        if not isinstance(d, dict):
            raise InvalidReview("an answer is not an object")
        fields = {"reviewer", "at", "photo_sha256", "count", "model", "answer_id"}
        if not {"reviewer", "at", "photo_sha256", "count"} <= set(d) <= fields:
            raise InvalidReview(f"an answer's fields are {sorted(d)[:10]}, not {sorted(fields)}")
        return cls(**d).checked(max_count)

    def to_dict(self) -> dict:
        return asdict(self)


def parse(raw: bytes, id_: str, *, max_bytes: int = MAX_REVIEW_BYTES, max_depth: int = MAX_JSON_DEPTH,
          max_count: int = 10**6) -> list[Answer]:
    """The answers of a ``reviews/<id>.json``; InvalidReview (or bounded.Refused, both ValueErrors)
    when it is larger or deeper than allowed, not JSON, about another bin, or holds an answer that
    is not one."""
    try:
        doc = bounded.loads(raw, max_bytes=max_bytes, max_depth=max_depth, what=f"{REVIEWS}/{id_}.json")
    except bounded.Refused:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidReview(f"{REVIEWS}/{id_}.json is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("id") != id_ or not isinstance(doc.get("answers"), list):
        raise InvalidReview(f"{REVIEWS}/{id_}.json is not the reviews of bin {id_} (an object with its id and answers)")
    return [Answer.from_dict(a, max_count) for a in doc["answers"]]


def dumps(id_: str, answers: list[Answer]) -> bytes:
    return json.dumps({"id": id_, "answers": [a.to_dict() for a in answers]}, indent=1).encode()


Status = Literal["settled", "disputed", "open", "unreadable"]


@dataclass(frozen=True)
class Settlement:
    """What a bin's answers add up to."""

    status: Status  # settled: a count; disputed: counts disagree; open: too few; unreadable: too many can't-tells
    count: int | None  # the settled count
    reviewers: tuple[str, ...]  # whose answers were considered (the latest of each person, on this photo)
    counts: tuple[int, ...]  # their counts, can't-tells left out
    cant_tell: int
    latest: str | None  # the newest considered answer's time

    def to_dict(self) -> dict:
        return asdict(self)


def settle(answers: list[Answer], *, photo_sha256: str | None = None, agreeing: int = 1,
           cant_tell_limit: int = 2) -> Settlement:
    """A bin's count from its answers: each person's latest answer on this photo (``photo_sha256``;
    answers about a photo since replaced do not count) is one vote; a count is settled when at
    least ``agreeing`` votes give it and they are a majority of the counted ones. Counts that
    disagree without a majority leave the bin disputed (it goes back into the queue); ``cant_tell_limit``
    people unable to count it make it unreadable (it leaves the queue, unlabelled)."""
    latest: dict[str, Answer] = {}
    for a in answers:  # file order is the order they were written
        if photo_sha256 is None or a.photo_sha256 == photo_sha256:
            latest.pop(a.reviewer, None)
            latest[a.reviewer] = a
    counts = tuple(a.count for a in latest.values() if a.count is not None)
    cant_tell = len(latest) - len(counts)
    newest = max((a.at for a in latest.values()), default=None)
    status: Status = "open"
    count = None
    if counts:
        top, votes = Counter(counts).most_common(1)[0]
        if votes * 2 > len(counts) and votes >= agreeing:
            status, count = "settled", top
        elif len(set(counts)) > 1:
            status = "disputed"
    if status != "settled" and cant_tell >= cant_tell_limit:
        status = "unreadable"
    return Settlement(status, count, tuple(latest), counts, cant_tell, newest)


class FolderReviews:
    """``<root>/reviews/`` in a folder: a lock per bin, atomic replacement."""

    def __init__(self, root: str | Path, *, max_bytes: int = MAX_REVIEW_BYTES, max_depth: int = MAX_JSON_DEPTH):
        self.root = Path(root)
        self.folder = self.root / REVIEWS
        self.max_bytes, self.max_depth = max_bytes, max_depth

    def describe(self, id_: str) -> str:
        return str(self.folder / f"{check_id(id_)}.json")

    def ids(self) -> Iterator[str]:
        if not self.folder.is_dir():
            return
        for name in sorted(os.listdir(self.folder)):
            stem = name.removesuffix(".json")
            if name.endswith(".json") and is_dataset_id(stem):
                yield stem

    def read(self, id_: str) -> bytes | None:
        """The bin's reviews file, or None when nobody has answered; bounded.Refused for one that
        must not be read (too large, a symlink out of the folder, a FIFO)."""
        try:
            return bounded.read_file(self.folder / f"{check_id(id_)}.json", root=self.folder, max_bytes=self.max_bytes)
        except FileNotFoundError:
            return None

    def answers(self, id_: str) -> list[Answer]:
        raw = self.read(id_)
        return [] if raw is None else parse(raw, id_, max_bytes=self.max_bytes, max_depth=self.max_depth)

    def append(self, id_: str, answer: Answer) -> list[Answer]:
        """Add ``answer`` to the bin's file; all its answers after the write."""
        from filelock import FileLock

        check_id(id_)
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.folder / f".{id_}.lock")):
            answers = [*self.answers(id_), answer]
            atomic_write(self.folder / f"{id_}.json", dumps(id_, answers))
        return answers


def _precondition_failed(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = exc.response.get("Error", {}).get("Code")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    # 409 ConditionalRequestConflict: another conditional write to the key was in flight.
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


class S3Reviews:
    """``s3://bucket/prefix/reviews/``: conditional writes (``If-Match`` / ``If-None-Match``)."""

    def __init__(self, source: S3Source, *, max_bytes: int = MAX_REVIEW_BYTES, max_depth: int = MAX_JSON_DEPTH):
        self.source = source
        self.max_bytes, self.max_depth = max_bytes, max_depth

    def key(self, id_: str) -> str:
        return f"{self.source.prefix}{REVIEWS}/{check_id(id_)}.json"

    def describe(self, id_: str) -> str:
        return f"s3://{self.source.bucket}/{self.key(id_)}"

    def ids(self) -> Iterator[str]:
        client, bucket = self.source.client, self.source.bucket
        kwargs = {"Bucket": bucket, "Prefix": f"{self.source.prefix}{REVIEWS}/", "MaxKeys": 1000}
        while True:
            page = self.source.call("list reviews in", lambda: client.list_objects_v2(**kwargs))
            for obj in page.get("Contents", []):
                name = obj["Key"].rsplit("/", 1)[-1]
                stem = name.removesuffix(".json")
                if name.endswith(".json") and is_dataset_id(stem):
                    yield stem
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def _get(self, id_: str) -> tuple[bytes | None, str | None]:
        """The object and its ETag; (None, None) when there is none."""
        from bincounter.data.sources import ObjectMissing

        key = self.key(id_)

        def get() -> tuple[bytes, str]:
            answer = self.source.client.get_object(Bucket=self.source.bucket, Key=key)
            if answer["ContentLength"] > self.max_bytes:
                answer["Body"].close()
                raise bounded.TooLarge(f"{key}: {answer['ContentLength']} bytes, over the limit of {self.max_bytes}")
            return answer["Body"].read(), answer["ETag"]

        try:
            return self.source.call(f"read {key} from", get)
        except ObjectMissing:
            return None, None

    def read(self, id_: str) -> bytes | None:
        return self._get(id_)[0]

    def answers(self, id_: str) -> list[Answer]:
        raw = self.read(id_)
        return [] if raw is None else parse(raw, id_, max_bytes=self.max_bytes, max_depth=self.max_depth)

    def append(self, id_: str, answer: Answer) -> list[Answer]:
        """Add ``answer``: read, append, write only if nobody wrote in between; else again."""
        key = self.key(id_)
        for attempt in range(_RACES):
            raw, etag = self._get(id_)
            answers = [] if raw is None else parse(raw, id_, max_bytes=self.max_bytes, max_depth=self.max_depth)
            if answer.answer_id and any(a.answer_id == answer.answer_id for a in answers):
                return answers  # a retried write that had landed: the answer is there once
            answers.append(answer)
            condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            body = dumps(id_, answers)

            def put() -> bool:
                try:
                    self.source.client.put_object(Bucket=self.source.bucket, Key=key, Body=body,
                                                  ContentType="application/json", **condition)
                except Exception as exc:
                    if _precondition_failed(exc):
                        return False
                    raise
                return True

            if self.source.call(f"write {key} to", put):
                return answers
            time.sleep(random.random() * min(1.0, 0.02 * 2**attempt))
        raise WriteConflict(f"{self.describe(id_)} kept changing under {_RACES} tries; the answer was not stored")


def open_reviews(cfg: SourceConfig, *, max_bytes: int = MAX_REVIEW_BYTES, max_depth: int = MAX_JSON_DEPTH,
                 **s3_options) -> FolderReviews | S3Reviews:
    """The reviews of the bins at ``cfg.uri`` (its ``reviews/``)."""
    if cfg.is_s3:
        return S3Reviews(S3Source(cfg, **s3_options), max_bytes=max_bytes, max_depth=max_depth)
    return FolderReviews(Path(cfg.uri.removeprefix("file://")), max_bytes=max_bytes, max_depth=max_depth)

