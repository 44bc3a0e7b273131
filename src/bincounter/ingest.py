"""Ingest: copy a subset of the Amazon Bin Image Dataset into a local folder, with a manifest.

The output folder keeps the bucket's layout (``bin-images/``, ``metadata/``) plus
``manifest.jsonl``: one line per id with its count, size, sha256 and source key. Every file is
written atomically, and the manifest doubles as a journal: a rerun skips ids whose files are
on disk and match their recorded sha256, so a killed ingest resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from bincounter.config import IngestConfig
from bincounter.sources import IMAGES, METADATA, ObjectMissing, Source, SourceError, open_source

MANIFEST = "manifest.jsonl"
ERRORS = "ingest_errors.jsonl"


@dataclass(frozen=True)
class IngestResult:
    out_dir: Path
    manifest: Path
    downloaded: int
    skipped: int
    failed: int
    bytes: int
    counts: dict[str, int] = field(default_factory=dict)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either absent or complete, never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ids_from_file_list(path: str | Path) -> list[str]:
    """Ids named by a Udacity ``file_list.json`` (``{"1": ["data/metadata/100313.json", ...]}``)."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object mapping counts to metadata paths")
    ids: list[str] = []
    for entries in raw.values():
        for entry in entries:
            stem = str(entry).rsplit("/", 1)[-1]
            ids.append(stem.removesuffix(".json").removesuffix(".jpg"))
    return list(dict.fromkeys(ids))


def parse_count(metadata: bytes) -> int | None:
    """``EXPECTED_QUANTITY`` from raw metadata, or None when it is unreadable or absent."""
    try:
        value = json.loads(metadata).get("EXPECTED_QUANTITY")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def load_manifest(path: Path) -> dict[str, dict]:
    """Entries by id; a line cut short by a kill is ignored (that id is fetched again)."""
    entries: dict[str, dict] = {}
    if not path.exists():
        return entries
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "id" in entry:
            entries[entry["id"]] = entry
    return entries


def _is_complete(out_dir: Path, entry: dict) -> bool:
    image = out_dir / IMAGES / f"{entry['id']}.jpg"
    meta = out_dir / METADATA / f"{entry['id']}.json"
    if not (image.exists() and meta.exists()) or image.stat().st_size != entry.get("bytes"):
        return False
    return sha256(image.read_bytes()) == entry.get("sha256")


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


def _fetch_one(source: Source, out_dir: Path, id_: str) -> dict:
    meta_key, image_key = source.key(METADATA, id_), source.key(IMAGES, id_)
    metadata = source.read(meta_key)
    image = source.read(image_key)
    atomic_write(out_dir / METADATA / f"{id_}.json", metadata)
    atomic_write(out_dir / IMAGES / f"{id_}.jpg", image)
    return {
        "id": id_,
        "count": parse_count(metadata),
        "bytes": len(image),
        "sha256": sha256(image),
        "metadata_sha256": sha256(metadata),
        "source_key": image_key,
    }


def _bounded_map(fn, items: Iterable, workers: int) -> Iterator[tuple[object, Future]]:
    """Run ``fn`` over a possibly endless stream with at most ``2 * workers`` items in flight."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: dict[Future, object] = {}
        iterator = iter(items)
        for item in itertools.islice(iterator, 2 * workers):
            pending[pool.submit(fn, item)] = item
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                item = pending.pop(fut)
                for nxt in itertools.islice(iterator, 1):
                    pending[pool.submit(fn, nxt)] = nxt
                yield item, fut


def _balanced_ids(source: Source, cfg: IngestConfig, ids: Iterable[str]) -> Iterator[str]:
    """Read metadata first and keep at most ``per_class`` ids of each count."""
    assert cfg.per_class is not None
    cap = cfg.max_count
    taken: Counter[int] = Counter()
    n_classes = None if cap is None else cap + 2  # 0..cap plus the pooled "more"

    def count_of(id_: str) -> int | None:
        return parse_count(source.read(source.key(METADATA, id_)))

    for id_, fut in _bounded_map(count_of, ids, cfg.workers):
        try:
            count = fut.result()
        except SourceError:
            continue
        if count is None:
            continue
        cls = count if cap is None or count <= cap else cap + 1
        if taken[cls] < cfg.per_class:
            taken[cls] += 1
            yield id_
        if n_classes is not None and len(taken) == n_classes and min(taken.values()) >= cfg.per_class:
            return


def select_ids(source: Source, cfg: IngestConfig) -> Iterator[str]:
    """The ids to ingest, streamed: explicit ids, a file list, or the source's listing."""
    if cfg.ids:
        ids: Iterable[str] = cfg.ids
    elif cfg.file_list:
        ids = ids_from_file_list(cfg.file_list)
    else:
        ids = source.iter_ids()
    if cfg.per_class:
        ids = _balanced_ids(source, cfg, ids)
    if cfg.limit:
        ids = itertools.islice(ids, cfg.limit)
    return iter(ids)


def ingest(cfg: IngestConfig, out_dir: str | Path) -> IngestResult:
    """Fetch the selected ids into ``out_dir``; resumable, concurrent, atomic."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = open_source(cfg.source, workers=cfg.workers, retries=cfg.retries,
                         connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout)
    source.check()  # fail fast with the endpoint's name rather than one error per object

    manifest_path = out_dir / MANIFEST
    known = load_manifest(manifest_path)
    done_before = {id_: e for id_, e in known.items() if _is_complete(out_dir, e)}
    journal = _Journal(manifest_path)
    errors: list[dict] = []
    fetched: dict[str, dict] = {}
    skipped = 0

    def todo() -> Iterator[str]:
        nonlocal skipped
        for id_ in select_ids(source, cfg):
            if id_ in done_before:
                skipped += 1
                fetched[id_] = done_before[id_]
            else:
                yield id_

    bar = tqdm(desc="ingest", unit="img", disable=not cfg.progress, total=cfg.limit)
    try:
        for id_, fut in _bounded_map(lambda i: _fetch_one(source, out_dir, i), todo(), cfg.workers):
            try:
                entry = fut.result()
            except ObjectMissing as exc:
                errors.append({"id": id_, "reason": "missing_object", "detail": str(exc)})
            except SourceError as exc:
                errors.append({"id": id_, "reason": "source_error", "detail": str(exc)})
            else:
                journal.write(entry)
                fetched[id_] = entry
            bar.update(1)
        bar.update(skipped)
    finally:
        bar.close()
        journal.close()

    if not fetched and errors:
        raise SourceError(f"no object could be fetched; first error: {errors[0]['detail']}")
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
        failed=len(errors),
        bytes=sum(e["bytes"] for e in fetched.values()),
        counts=dict(sorted(counts.items())),
    )
