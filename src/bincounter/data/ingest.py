"""Ingest: copy a subset of the Amazon Bin Image Dataset into a local folder, with a manifest.

The output folder keeps the bucket's layout (``bin-images/``, ``metadata/``) plus
``manifest.jsonl``: one line per id with its count, size, sha256 and source key. Every file is
written atomically, and the manifest doubles as a journal: a rerun skips ids whose files are
on disk and match their recorded sha256, so a killed ingest resumes where it stopped (and
first deletes the hidden ``*.part`` files a kill leaves). Ids that cannot be fetched after
retries, or whose objects must not be read or parsed (a symlink out of a source folder, a FIFO,
metadata over the size or nesting limits), go to ``ingest_errors.jsonl`` with a reason and are
not copied; a lock keeps a second ingest out.

With ``reviews`` (a root in the bucket's layout whose ``reviews/<id>.json`` hold people's counts,
``bincounter review``), every bin whose answers settle a count is ingested too, from that root, and
its manifest entry carries the person's count as ``count``, the record's as ``record_count``,
``label_source: "review"`` and where the label came from (the reviews object, its sha256, who and
when); the review file is copied to ``reviews/<id>.json``. A review counts only for the photo it
was given on (its sha256): a photo replaced since keeps its record's count.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from bincounter.config import IngestConfig
from bincounter.fileio import atomic_write
from bincounter.ids import check_id, is_dataset_id
from bincounter.data import bounded
from bincounter.data import validate as v
from bincounter.data import reviews as R
from bincounter.data.sources import IMAGES, METADATA, ObjectMissing, Source, SourceError, open_source
from bincounter.data.split import shard_of

MANIFEST = "manifest.jsonl"
ERRORS = "ingest_errors.jsonl"
# What a review adds to a manifest entry; recomputed on every run (answers keep coming).
REVIEW_FIELDS = ("record_count", R.LABEL_SOURCE, "review")
# Error records about reviews: the bin itself was fetched (or never asked for), nothing failed.
REVIEW_REASONS = ("unreadable_review", "review_of_another_photo")


@dataclass(frozen=True)
class IngestResult:
    out_dir: Path
    manifest: Path
    downloaded: int
    skipped: int
    failed: int
    bytes: int
    counts: dict[str, int] = field(default_factory=dict)
    retries: int = 0  # requests retried after throttling, 5xx or a broken connection
    reviewed: int = 0  # bins labelled with a person's count (``reviews``)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ids_from_file_list(path: str | Path, cfg: IngestConfig) -> list[str]:
    """Ids named by a Udacity ``file_list.json`` (``{"1": ["data/metadata/100313.json", ...]}``).

    Every id is checked before any is fetched: one that is not a dataset id fails the whole list,
    and so does a list over the size or nesting limits (bounded.Refused, a ValueError).
    """
    raw = bounded.loads(bounded.read_file(path, max_bytes=cfg.max_file_list_bytes), max_bytes=cfg.max_file_list_bytes,
                        max_depth=cfg.max_json_depth, what=str(path))
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise ValueError(f"{path}: expected an object mapping counts to lists of metadata paths")
    ids: list[str] = []
    for entries in raw.values():
        for entry in entries:
            stem = str(entry).rsplit("/", 1)[-1]
            ids.append(check_id(stem.removesuffix(".json").removesuffix(".jpg"), f"{path}: {entry!r}"))
    return list(dict.fromkeys(ids))


_REFUSED = (v.METADATA_TOO_LARGE, v.METADATA_TOO_DEEP)


def parse_count(metadata: bytes, cfg: IngestConfig) -> int | None:
    """``EXPECTED_QUANTITY`` from raw metadata, or None when it states no plain count (preprocess
    quarantines it with the reason). Raises validate.Invalid for metadata over the size or
    nesting limits: such an object is recorded as an error, not copied."""
    try:
        return v.read_count(metadata, max_bytes=cfg.max_metadata_bytes, max_depth=cfg.max_json_depth)
    except v.Invalid as exc:
        if exc.reason in _REFUSED:
            raise
        return None


def load_manifest(path: Path, cfg: IngestConfig = IngestConfig()) -> dict[str, dict]:
    """Entries by id; a line cut short by a kill, or over the limits, is ignored (that id is
    fetched again)."""
    entries: dict[str, dict] = {}
    if not path.exists():
        return entries
    for _, entry in bounded.json_lines(path, max_bytes=cfg.max_metadata_bytes, max_depth=cfg.max_json_depth):
        # An entry whose id could not be a file name is ignored like a torn line (never read).
        if isinstance(entry, dict) and is_dataset_id(entry.get("id")):
            entries[entry["id"]] = entry
    return entries


def _is_complete(out_dir: Path, entry: dict) -> bool:
    """Both files present and matching the hashes recorded when they were downloaded."""
    image = out_dir / IMAGES / f"{entry['id']}.jpg"
    meta = out_dir / METADATA / f"{entry['id']}.json"
    try:
        if image.stat().st_size != entry.get("bytes"):
            return False
        if "metadata_sha256" in entry and sha256(meta.read_bytes()) != entry["metadata_sha256"]:
            return False
        return sha256(image.read_bytes()) == entry.get("sha256")
    except (FileNotFoundError, TypeError, KeyError):
        return False


def _remove_partials(out_dir: Path) -> int:
    """Delete temporary files left by a killed run (``.<name>.*.part``); they are never data."""
    removed = 0
    for sub in (IMAGES, METADATA, R.REVIEWS):
        folder = out_dir / sub
        if folder.is_dir():
            for name in os.listdir(folder):
                if name.startswith(".") and name.endswith(".part"):
                    (folder / name).unlink(missing_ok=True)
                    removed += 1
    return removed


class _Journal:
    """Appends manifest lines from many threads; each line is flushed as soon as it is known."""

    def __init__(self, path: Path):
        self._lock = threading.Lock()
        self._file = path.open("a", encoding="utf-8")

    def write(self, entry: dict) -> None:
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def _read(source: Source, kind: str, id_: str, max_bytes: int | None = None) -> bytes:
    try:
        return source.read(source.key(kind, id_), max_bytes)
    except ObjectMissing as exc:
        exc.kind = kind  # which twin is missing, for the error record
        raise
    except bounded.Refused as exc:
        raise v.refusal(exc) from exc


def _fetch_one(source: Source, out_dir: Path, id_: str, cfg: IngestConfig, metadata: bytes | None = None) -> dict:
    """Download one id's metadata (unless already read) and image; write both atomically.

    The image is written last, so a manifest entry always describes two complete files. An
    object that must not be read or parsed raises validate.Invalid before anything is written.
    """
    if metadata is None:
        metadata = _read(source, METADATA, id_, cfg.max_metadata_bytes)
    count = parse_count(metadata, cfg)
    image = _read(source, IMAGES, id_)
    atomic_write(out_dir / METADATA / f"{id_}.json", metadata)
    atomic_write(out_dir / IMAGES / f"{id_}.jpg", image)
    return {
        "id": id_,
        "count": count,
        "bytes": len(image),
        "sha256": sha256(image),
        "metadata_sha256": sha256(metadata),
        "source_key": source.key(IMAGES, id_),
    }


def _bounded_map(fn, items: Iterable, workers: int, ordered: bool = False) -> Iterator[tuple[object, Future]]:
    """Run ``fn`` over a possibly endless stream with at most ``2 * workers`` items in flight.

    Yields (item, future) as they finish, or in input order with ``ordered`` (a selection
    must not depend on which request happened to be fastest). If the consumer stops early
    or fails, queued items are cancelled rather than run.
    """
    pool = ThreadPoolExecutor(max_workers=workers)
    pending: dict[Future, object] = {}
    iterator = iter(items)
    try:
        for item in itertools.islice(iterator, 2 * workers):
            pending[pool.submit(fn, item)] = item
        while pending:
            if ordered:
                fut = next(iter(pending))  # dicts keep submission order
                wait([fut])
                done = [fut]
            else:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                item = pending.pop(fut)
                for nxt in itertools.islice(iterator, 1):
                    pending[pool.submit(fn, nxt)] = nxt
                yield item, fut
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _balanced_ids(source: Source, cfg: IngestConfig, ids: Iterable[str], known: dict[str, dict],
                  prefetched: dict[str, bytes]) -> Iterator[str]:
    """Read metadata first and keep at most ``per_class`` ids of each count, in listing order.

    The metadata of a kept id goes into ``prefetched`` so it is not downloaded twice; ids
    already complete on disk are classed by their manifest entry, without a request.
    """
    assert cfg.per_class is not None
    cap = cfg.max_count
    taken: Counter[int] = Counter()
    n_classes = None if cap is None else cap + 2  # 0..cap plus the pooled "more"

    def count_of(id_: str) -> tuple[int | None, bytes | None]:
        if id_ in known:
            return known[id_].get("count"), None
        raw = _read(source, METADATA, id_, cfg.max_metadata_bytes)
        return parse_count(raw, cfg), raw

    for id_, fut in _bounded_map(count_of, ids, cfg.workers, ordered=True):
        try:
            count, raw = fut.result()
        except (SourceError, v.Invalid):
            continue  # no metadata, or none that may be read: no class, so the id cannot be selected by count
        if count is None:
            continue
        cls = count if cap is None or count <= cap else cap + 1
        if taken[cls] < cfg.per_class:
            taken[cls] += 1
            if raw is not None:
                prefetched[id_] = raw
            yield id_
        if n_classes is not None and len(taken) == n_classes and min(taken.values()) >= cfg.per_class:
            return


def select_ids(source: Source, cfg: IngestConfig, *, known: dict[str, dict] | None = None,
               prefetched: dict[str, bytes] | None = None) -> Iterator[str]:
    """The ids to ingest, streamed: explicit ids, a file list, or the source's listing.

    ``known`` (manifest entries of complete ids) and ``prefetched`` (filled with metadata
    read while selecting) only matter for ``per_class``, which has to read counts first.
    """
    if cfg.ids:
        ids: Iterable[str] = list(dict.fromkeys(cfg.ids))
    elif cfg.file_list:
        ids = ids_from_file_list(cfg.file_list, cfg)
    else:
        ids = source.iter_ids()
    if cfg.per_class:
        ids = _balanced_ids(source, cfg, ids, known or {}, {} if prefetched is None else prefetched)
    if cfg.limit:
        ids = itertools.islice(ids, cfg.limit)
    return iter(ids)


def _expected_total(cfg: IngestConfig) -> int | None:
    """How many ids the selection will give at most, when known up front (progress bar)."""
    n = None
    if cfg.per_class:
        pass  # depends on the counts, read as the selection goes
    elif cfg.ids:
        n = len(set(cfg.ids))
    elif cfg.file_list:
        n = len(ids_from_file_list(cfg.file_list, cfg))
    if cfg.limit is not None:
        n = cfg.limit if n is None else min(n, cfg.limit)
    return n


@dataclass
class _Reviews:
    """People's answers read at the start of an ingest: by bin, and where to fetch their photos."""

    store: R.FolderReviews | R.S3Reviews
    source: Source
    answers: dict[str, tuple[list[R.Answer], bytes]] = field(default_factory=dict)  # id -> (answers, file)


def _read_reviews(cfg: IngestConfig, source: Source, shard: int, shards: int,
                  errors: list[dict]) -> _Reviews | None:
    """Every reviews file at ``cfg.reviews`` (of this shard); unreadable ones go to ``errors``."""
    if not cfg.reviews:
        return None
    root = cfg.source.model_copy(update={"uri": cfg.reviews})
    options = dict(workers=cfg.workers, retries=cfg.retries, connect_timeout=cfg.connect_timeout,
                   read_timeout=cfg.read_timeout)
    store = R.open_reviews(root, max_bytes=cfg.max_review_bytes, max_depth=cfg.max_json_depth, **options)
    if root.uri.rstrip("/") != cfg.source.uri.rstrip("/"):
        source = open_source(root, **options)
        source.check()
    found = _Reviews(store, source)
    ids = [i for i in store.ids() if shards == 1 or shard_of(i, shards) == shard]

    def read(id_: str) -> tuple[list[R.Answer], bytes] | None:
        raw = store.read(id_)
        return None if raw is None else (R.parse(raw, id_, max_bytes=cfg.max_review_bytes,
                                                 max_depth=cfg.max_json_depth), raw)

    for id_, fut in _bounded_map(read, ids, cfg.workers):
        try:
            got = fut.result()
        except (ValueError, SourceError) as exc:  # InvalidReview, bounded.Refused, unreachable
            errors.append({"id": id_, "reason": "unreadable_review", "detail": str(exc)[:300]})
            continue
        if got is not None and any(a.count is not None for a in got[0]):
            found.answers[id_] = got
    return found


def _with_review(entry: dict, reviews: _Reviews | None, out_dir: Path, cfg: IngestConfig,
                 errors: list[dict]) -> dict:
    """The manifest entry with its review's label and lineage (or without, when none settles)."""
    entry = {k: v for k, v in entry.items() if k not in REVIEW_FIELDS} | (
        {"count": entry["record_count"]} if "record_count" in entry else {})
    if reviews is None or entry["id"] not in reviews.answers:
        return entry
    answers, raw = reviews.answers[entry["id"]]
    settled = R.settle(answers, photo_sha256=entry["sha256"], agreeing=cfg.reviews_agreeing)
    if not settled.reviewers:
        errors.append({"id": entry["id"], "reason": "review_of_another_photo",
                       "detail": "the answers are about a photo since replaced: the record's count is kept"})
        return entry
    if settled.status != "settled":
        return entry
    atomic_write(out_dir / R.REVIEWS / f"{entry['id']}.json", raw)
    return {**entry, "count": settled.count, "record_count": entry["count"], R.LABEL_SOURCE: R.FROM_REVIEW,
            "review": {"source": reviews.store.describe(entry["id"]), "sha256": sha256(raw),
                       "reviewers": list(settled.reviewers), "counts": list(settled.counts),
                       "latest": settled.latest, "models": sorted({a.model for a in answers if a.model})}}


def _drop_stale_review_copies(out_dir: Path, reviewed: set[str]) -> None:
    """A bin labelled by people in an earlier run whose answers no longer settle keeps no copy."""
    folder = out_dir / R.REVIEWS
    if folder.is_dir():
        for name in os.listdir(folder):
            if name.endswith(".json") and name.removesuffix(".json") not in reviewed:
                (folder / name).unlink(missing_ok=True)


def _lock(out_dir: Path):
    """Hold the output folder: two ingests appending to one journal would corrupt it."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(out_dir / ".ingest.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout as exc:
        raise RuntimeError(f"another ingest is writing to {out_dir}") from exc
    return lock


def ingest(cfg: IngestConfig, out_dir: str | Path, shard: int = 0, shards: int = 1) -> IngestResult:
    """Fetch the selected ids into ``out_dir``; resumable, concurrent, atomic.

    With ``shards`` > 1, keeps only the selected ids of shard ``shard`` (``split.shard_of``):
    every shard makes the same selection, so the shards together hold exactly the unsharded one.
    """
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not one of 0..{shards - 1}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = open_source(cfg.source, workers=cfg.workers, retries=cfg.retries,
                         connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout)
    source.check()  # fail fast with the endpoint's name rather than one error per object
    lock = _lock(out_dir)
    try:
        return _ingest_locked(cfg, source, out_dir, shard, shards)
    finally:
        lock.release()


def _ingest_locked(cfg: IngestConfig, source: Source, out_dir: Path, shard: int = 0, shards: int = 1) -> IngestResult:
    _remove_partials(out_dir)
    manifest_path = out_dir / MANIFEST
    known = load_manifest(manifest_path, cfg)
    done_before = {id_: e for id_, e in known.items() if _is_complete(out_dir, e)}
    prefetched: dict[str, bytes] = {}
    errors: list[dict] = []
    reviews = _read_reviews(cfg, source, shard, shards, errors)
    journal = _Journal(manifest_path)
    fetched: dict[str, dict] = {}
    skipped = 0
    bar = tqdm(desc="ingest", unit="img", disable=not cfg.progress, total=_expected_total(cfg))
    selected: set[str] = set()

    def chosen() -> Iterator[str]:
        yield from select_ids(source, cfg, known=done_before, prefetched=prefetched)
        if reviews is not None:  # people's counts join whatever the selection was
            yield from (i for i in sorted(reviews.answers) if i not in selected)

    def todo() -> Iterator[str]:
        nonlocal skipped
        for id_ in chosen():
            if shards > 1 and shard_of(id_, shards) != shard:
                prefetched.pop(id_, None)  # another shard's: its metadata is not kept here
                continue
            selected.add(id_)
            if id_ in done_before:
                skipped += 1
                fetched[id_] = done_before[id_]
                bar.update(1)
            else:
                yield id_

    def fetch(id_: str) -> dict:
        from_reviews = reviews is not None and id_ in reviews.answers and reviews.source is not source
        return _fetch_one(reviews.source if from_reviews else source, out_dir, id_, cfg, prefetched.pop(id_, None))

    try:
        for id_, fut in _bounded_map(fetch, todo(), cfg.workers):
            try:
                entry = fut.result()
            except ObjectMissing as exc:
                reason = "missing_metadata" if getattr(exc, "kind", None) == METADATA else "missing_image"
                errors.append({"id": id_, "reason": reason, "detail": str(exc)})
            except v.Invalid as exc:
                errors.append({"id": id_, "reason": exc.reason, "detail": exc.detail})
            except SourceError as exc:
                errors.append({"id": id_, "reason": "source_error", "detail": str(exc)})
            else:
                journal.write(entry)
                fetched[id_] = entry
            bar.update(1)
    finally:
        bar.close()
        journal.close()

    if not fetched and errors:
        raise SourceError(f"no object could be fetched; first error: {errors[0]['detail']}")
    fetched = {i: _with_review(e, reviews, out_dir, cfg, errors) for i, e in fetched.items()}
    _drop_stale_review_copies(out_dir, {i for i, e in fetched.items() if e.get(R.LABEL_SOURCE) == R.FROM_REVIEW})
    # The journal may hold duplicates from earlier runs: rewrite it once, sorted and unique.
    lines = "".join(json.dumps(fetched[i], sort_keys=True) + "\n" for i in sorted(fetched))
    atomic_write(manifest_path, lines.encode())
    atomic_write(out_dir / ERRORS, "".join(json.dumps(e) + "\n" for e in errors).encode())
    counts = Counter(str(e["count"]) for e in fetched.values())
    return IngestResult(
        out_dir=out_dir,
        manifest=manifest_path,
        downloaded=len(fetched) - skipped,
        skipped=skipped,
        failed=sum(1 for e in errors if e["reason"] not in REVIEW_REASONS),
        bytes=sum(e["bytes"] for e in fetched.values()),
        counts=dict(sorted(counts.items())),
        retries=getattr(source, "retried", 0),
        reviewed=sum(1 for e in fetched.values() if e.get(R.LABEL_SOURCE) == R.FROM_REVIEW),
    )
