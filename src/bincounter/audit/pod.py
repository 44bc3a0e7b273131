"""Audit a pod: count every bin, compare with the expected counts, flag the mismatches.

Photos stream from the source (S3, any endpoint, or a folder in the bucket's layout) through
a bounded pool of downloads into batches counted in-process by a registered model or by a
deployed server, so memory stays flat however many bins there are. Every counted batch is
committed to a journal (SQLite, fsync on commit) in the output folder before the next
one is recorded: a killed audit rerun with the same ``out_dir`` recounts nothing it already
counted. Verdicts are not journaled but derived from the stored probabilities when the
outputs are written, so a rerun with other thresholds recounts nothing either.

The output files are ``bincounter.audit.outputs``'s: ``audit.csv`` and ``audit.parquet`` (one
row per bin), ``audit_errors.csv`` (bins that could not be checked, and why), ``summary.json``
and ``report.html``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bincounter.audit.outputs import (  # noqa: F401 - the audit's public names live here too
    COLUMNS,
    CSV_FILE,
    ERRORS_FILE,
    PARQUET_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    AuditSummary,
    write_outputs,
)
from bincounter.config import AuditConfig
from bincounter.ids import check_id
from bincounter.data import bounded
from bincounter.data import validate as v
from bincounter.data.sources import IMAGES, METADATA, LocalSource, ObjectMissing, open_source
from bincounter.serving.verdict import first_count, judge, probability_of

JOURNAL = "audit_journal.sqlite"
MAX_EXPECTED = 1000  # the server's bound for ?expected=


@dataclass
class _Photo:
    id: str
    expected: int
    image: bytes


@dataclass
class _Failed:
    id: str
    reason: str


class AuditError(RuntimeError):
    """The audit cannot go on (source or server unreachable, folder holds another audit)."""


# -- the journal --------------------------------------------------------------------------


class Journal:
    """Counted bins and failures in one SQLite file; one writer (the audit's main thread)."""

    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(path, isolation_level="DEFERRED")
        # WAL + synchronous=FULL: every commit is on disk (fsync) before the audit goes on.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS bins (
                id TEXT PRIMARY KEY, expected INTEGER NOT NULL, predicted INTEGER NOT NULL,
                confidence REAL NOT NULL, probability_of_expected REAL, probabilities TEXT NOT NULL,
                first_count INTEGER NOT NULL, thumbnail BLOB, open_ended INTEGER NOT NULL DEFAULT 0);
            CREATE TABLE IF NOT EXISTS errors (id TEXT PRIMARY KEY, reason TEXT NOT NULL);
        """)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(bins)")}
        if "open_ended" not in columns:  # a journal from before pooled last classes were journaled
            self.db.execute("ALTER TABLE bins ADD COLUMN open_ended INTEGER NOT NULL DEFAULT 0")
        self.db.commit()

    def claim(self, identity: dict[str, str]) -> None:
        """Record what this folder audits; refuse to mix in counts of another model or source."""
        known = dict(self.db.execute("SELECT key, value FROM meta"))
        for key, value in identity.items():
            if key in known and known[key] != value:
                raise AuditError(f"{self.path.parent} holds an audit with {key}={known[key]!r}, not {value!r}: "
                                 "use another --out folder (or delete this one) to start afresh")
        self.db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", identity.items())
        self.db.commit()

    def expected_of(self, id_: str) -> int | None:
        row = self.db.execute("SELECT expected FROM bins WHERE id = ?", (id_,)).fetchone()
        return None if row is None else row[0]

    def counted(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM bins").fetchone()[0]

    def add(self, row: dict) -> None:
        self.db.execute("INSERT OR IGNORE INTO bins (id, expected, predicted, confidence, probability_of_expected, "
                        "probabilities, first_count, thumbnail, open_ended) VALUES (:id, :expected, :predicted, "
                        ":confidence, :probability_of_expected, :probabilities, :first_count, :thumbnail, "
                        ":open_ended)", row)

    def retry(self, id_: str) -> None:
        """Forget an earlier run's failure of ``id_``: it is being tried again."""
        self.db.execute("DELETE FROM errors WHERE id = ?", (id_,))

    def fail(self, id_: str, reason: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO errors VALUES (?, ?)", (id_, reason))

    def commit(self) -> None:
        self.db.commit()

    def rows(self) -> Iterator[tuple]:
        """Every counted bin, sorted by id, streamed."""
        yield from self.db.execute("SELECT id, expected, predicted, probability_of_expected, confidence, "
                                   "probabilities, first_count, open_ended FROM bins ORDER BY id")

    def errors(self) -> Iterator[tuple[str, str]]:
        yield from self.db.execute("SELECT id, reason FROM errors ORDER BY id")

    def thumbnail(self, id_: str) -> bytes | None:
        row = self.db.execute("SELECT thumbnail FROM bins WHERE id = ?", (id_,)).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        self.db.close()


# -- what to audit -----------------------------------------------------------------------


def _csv_chunks(uri: str, cfg: AuditConfig) -> Iterator[bytes]:
    """The expected-counts CSV's bytes, chunk by chunk, from a local path or s3://bucket/key."""
    if uri.startswith("s3://"):
        from bincounter.data.sources import S3Source

        bucket, _, key = uri[len("s3://"):].partition("/")
        source = S3Source(cfg.source.model_copy(update={"uri": f"s3://{bucket}"}), retries=cfg.retries)
        body = source._call(f"read {key} from", lambda: source.client.get_object(Bucket=bucket, Key=key)["Body"])
        yield from body.iter_chunks(1 << 16)
        return
    yield from bounded.file_chunks(uri)


def _csv_lines(uri: str, cfg: AuditConfig, dropped: set[int]) -> Iterator[str]:
    """The CSV's lines, decoded (bytes that are not UTF-8 replaced, so the row fails its checks
    rather than the audit). A line over ``max_csv_line_bytes`` is never held: it comes as an
    empty line, and its number goes into ``dropped``."""
    lines = bounded.capped_lines(_csv_chunks(uri, cfg), cfg.max_csv_line_bytes)
    for n, line in enumerate(lines, start=1):
        if line is None:
            dropped.add(n)
            yield "\n"
        else:
            yield line.decode("utf-8-sig" if n == 1 else "utf-8", "replace")


def _parse_expected(text: str) -> int:
    value = int(text.strip())  # ValueError for anything but an integer
    if not 0 <= value <= MAX_EXPECTED:
        raise ValueError(f"expected count {value} is outside 0..{MAX_EXPECTED}")
    return value


def _rows(reader, journal: Journal, where: str) -> Iterator[list[str]]:
    """The reader's rows; one it cannot parse (a quote left open until the field outgrows
    csv's limit) is recorded as an error, and reading goes on after it."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            journal.fail(f"csv line {reader.line_num}", f"{where} line {reader.line_num}: {exc}")


def _from_csv(cfg: AuditConfig, journal: Journal) -> Iterator[tuple[str, int]]:
    """(id, expected) per CSV row; bad rows are recorded as errors and skipped."""
    dropped: set[int] = set()
    reader = csv.reader(_csv_lines(cfg.expected_csv, cfg, dropped))
    header = [h.strip().lower() for h in next(reader, [])]
    if "id" not in header or "expected" not in header:
        raise AuditError(f"{cfg.expected_csv}: the first line must name the columns 'id' and 'expected', "
                         f"got {header!r}")
    i_id, i_exp = header.index("id"), header.index("expected")
    for row in _rows(reader, journal, cfg.expected_csv):
        line = reader.line_num  # of the file, where a quoted field spans lines
        if line in dropped:
            journal.fail(f"csv line {line}", f"{cfg.expected_csv} line {line}: longer than "
                         f"{cfg.max_csv_line_bytes} bytes (max_csv_line_bytes)")
            continue
        if not row or not any(cell.strip() for cell in row):
            continue
        try:
            id_ = check_id(row[i_id].strip())
            expected = _parse_expected(row[i_exp])
        except (IndexError, ValueError) as exc:
            journal.fail(f"csv line {line}", f"{cfg.expected_csv} line {line}: {exc}")
            continue
        yield id_, expected


def _from_source(source, journal: Journal) -> Iterator[tuple[str, None]]:
    for id_ in source.iter_ids():
        try:
            yield check_id(id_), None
        except ValueError as exc:
            journal.fail(id_[:200], str(exc))


_RECENT = 10_000


def _todo(cfg: AuditConfig, source, journal: Journal) -> Iterator[tuple[str, int | None]]:
    """Ids still to count, in listing (or CSV) order; counted ones are skipped."""
    listed = _from_csv(cfg, journal) if cfg.expected_csv else _from_source(source, journal)
    # Ids listed lately, still in flight perhaps: a bounded window (far wider than what is in
    # flight), so a repeated id is caught before it is counted twice without holding them all.
    recent: OrderedDict[str, int | None] = OrderedDict()
    for id_, expected in listed:
        seen = id_ in recent
        known = recent[id_] if seen else journal.expected_of(id_)
        if seen or known is not None:
            if expected is not None and known is not None and known != expected:
                journal.fail(id_, f"listed again with expected {expected} (first listed with {known})")
            continue
        recent[id_] = expected
        if len(recent) > _RECENT:
            recent.popitem(last=False)
        journal.retry(id_)
        yield id_, expected


def _fetch(source, id_: str, expected: int | None, cfg: AuditConfig) -> _Photo | _Failed:
    """One bin's photo (and metadata when the expected count comes from it, parsed within the
    limits: a label that is not a plain count is an error, never a guess)."""
    try:
        if expected is None:
            metadata = source.read(source.key(METADATA, id_), cfg.max_metadata_bytes)
            expected = v.read_count(metadata, max_bytes=cfg.max_metadata_bytes, max_depth=cfg.max_json_depth)
            if expected > MAX_EXPECTED:
                return _Failed(id_, f"EXPECTED_QUANTITY {expected} is over {MAX_EXPECTED}")
        return _Photo(id_, expected, source.read(source.key(IMAGES, id_)))
    except v.Invalid as exc:
        return _Failed(id_, f"metadata: {exc}")
    except (ObjectMissing, bounded.Refused) as exc:  # Refused: a symlink out of the folder, a FIFO, too large
        return _Failed(id_, str(exc))


# -- who counts ----------------------------------------------------------------------------


class LocalCounter:
    """A registered MLflow pyfunc (raw image bytes in), loaded in this process."""

    slots = 1  # torch already uses every core for one batch

    def __init__(self, model_uri: str):
        import mlflow.pyfunc

        from bincounter.evaluation.calibration import model_run_id

        run_id, pinned = model_run_id(model_uri)
        # An alias moves; counting and calibration must both use the version it points to now.
        self.name = pinned if run_id is not None and pinned.startswith("models:/") else model_uri
        self.model_uri: str | None = self.name
        self.pinned_uri = self.name
        self.model = mlflow.pyfunc.load_model(self.name)
        names = (self.model.metadata.metadata or {}).get("class_names")
        self.labels = [str(n) for n in names] if isinstance(names, list) else None

    def count(self, images: list[bytes]) -> list[dict | str]:
        """One prediction dict per image, or the reason it could not be counted."""
        import pandas as pd

        try:
            return _records(self.model.predict(pd.DataFrame({"image": images})), self.labels)
        except ValueError as exc:
            if len(images) == 1:
                return [f"could not count the photo: {exc}"]
        # One bad photo fails its batch: count the others one by one.
        return [self.count([image])[0] for image in images]


def _load_counter(model_uri: str) -> LocalCounter:
    try:
        return LocalCounter(model_uri)
    except Exception as exc:  # noqa: BLE001 - MLflow and unpickling fail in many ways; name the model
        raise AuditError(f"cannot load the model {model_uri}: {type(exc).__name__}: {exc}") from exc


class RemoteCounter:
    """A deployed bincounter server, through ``POST /v1/count:batch``."""

    def __init__(self, url: str, cfg: AuditConfig):
        self.name = url
        self.cfg = cfg
        self.slots = cfg.requests
        served = _served_model(url, cfg.request_timeout)
        self.model_uri: str | None = served.get("model_uri")  # as the server reports it
        self.version: str | None = served.get("model_version")

    @property
    def served(self) -> str:
        """What this audit counts with: the server's model and its registry version."""
        return f"{self.model_uri} v{self.version}" if self.version else str(self.model_uri)

    @property
    def pinned_uri(self) -> str | None:
        """``models:/<name>/<version>`` of what the server serves (its calibration's run), else its URI."""
        match = re.match(r"^models:/([^/@]+)", self.model_uri or "")
        return f"models:/{match.group(1)}/{self.version}" if match and self.version else self.model_uri

    def count(self, images: list[bytes], ids: list[str] | None = None) -> list[dict | str]:
        from bincounter.serving.client import ImageRefused, count_batch

        ids = ids or [str(i) for i in range(len(images))]
        try:
            answers = count_batch(self.name, [(f"{i}.jpg", im) for i, im in zip(ids, images)],
                                  timeout=self.cfg.request_timeout, retries=self.cfg.retries)
        except ImageRefused as exc:
            if len(images) == 1:
                return [f"the server refused the photo: {exc}"]
            return [self.count([image], [id_])[0] for image, id_ in zip(images, ids)]
        except ConnectionError as exc:
            raise AuditError(str(exc)) from None
        for answer in answers:
            if not _is_prediction(answer):
                raise AuditError(f"{self.name} answered {str(answer)[:200]!r}, not a count with probabilities: "
                                 "is it a bincounter server?")
        for answer in answers:
            now = answer.get("model_version")
            if now != self.version or (answer.get("model_uri") not in (None, self.model_uri)):
                raise AuditError(f"{self.name} now serves {answer.get('model_uri')} v{now}, not {self.served} that "
                                 "this audit counts with (a redeploy happened): the bins counted so far are kept; "
                                 "rerun with another --out to audit with the new model")
        return answers


def _served_model(url: str, timeout: float) -> dict:
    """The model the server at ``url`` serves (its ``/readyz``): URI and registry version."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url.rstrip('/')}/readyz", timeout=timeout) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise AuditError(f"the bincounter server at {url} is not ready ({exc.code}): {exc.read()[:300]!r}") from None
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot reach the bincounter server at {url}: {exc}") from None
    if not isinstance(body, dict) or "model_uri" not in body:
        raise AuditError(f"{url}/readyz answered {str(body)[:200]!r}: is it a bincounter server?")
    return body


def _is_prediction(answer: object) -> bool:
    if not isinstance(answer, dict) or not isinstance(answer.get("count"), int):
        return False
    probs = answer.get("probabilities")
    return (isinstance(probs, list) and len(probs) > 0 and all(isinstance(p, (int, float)) for p in probs)
            and isinstance(answer.get("confidence"), (int, float)))


def _records(frame, labels: list[str] | None) -> list[dict]:
    return [{"count": int(r["count"]), "confidence": float(r["confidence"]),
             "probabilities": [float(p) for p in r["probabilities"]], "label": r.get("label"), "labels": labels}
            for r in frame.to_dict("records")]


def open_ended(answer: dict) -> bool:
    """Whether the model's last class pools every count from its own up ("6+"): from the class
    names every answer carries (the server's and the in-process model's alike), else from the
    predicted class's name."""
    labels = answer.get("labels")
    if isinstance(labels, list) and len(labels) == len(answer["probabilities"]) and labels:
        return str(labels[-1]).endswith("+")
    label = answer.get("label")
    return isinstance(label, str) and label.endswith("+")


def _row(photo: _Photo, answer: dict, cfg: AuditConfig, chosen: dict) -> dict:
    probs = [float(p) for p in answer["probabilities"]]
    first = first_count(int(answer["count"]), probs)
    pooled = open_ended(answer)
    p = probability_of(photo.expected, probs, first, open_ended=pooled)
    # Thumbnails only for the bins a person may look at; a later rerun with other thresholds
    # shows "no thumbnail" for bins it newly flags rather than downloading them again.
    keep_thumb = judge(photo.expected, probs, first, pooled, cfg.verdict, chosen)["verdict"] != "match"
    return {"id": photo.id, "expected": photo.expected, "predicted": int(answer["count"]),
            "confidence": float(answer["confidence"]), "probability_of_expected": p,
            "probabilities": json.dumps(probs), "first_count": first, "open_ended": int(pooled),
            "thumbnail": _thumbnail(photo.image, cfg.thumbnail_px) if keep_thumb else None}


def _thumbnail(image: bytes, px: int) -> bytes | None:
    """A small JPEG of the photo, or None when it cannot be made (the count already succeeded)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as im:
            im.draft("RGB", (px, px))  # JPEG: decode at a fraction of the size
            im = im.convert("RGB")
            im.thumbnail((px, px))
            out = io.BytesIO()
            im.save(out, "JPEG", quality=70)
            return out.getvalue()
    except Exception:  # noqa: BLE001 - a missing thumbnail must not lose a count
        return None


# -- the run -------------------------------------------------------------------------------


def _count(counter, batch: list[_Photo], cfg: AuditConfig, chosen: dict) -> list[dict | _Failed]:
    images = [p.image for p in batch]
    if isinstance(counter, RemoteCounter):
        answers = counter.count(images, [p.id for p in batch])
    else:
        answers = counter.count(images)
    return [_Failed(p.id, a) if isinstance(a, str) else _row(p, a, cfg, chosen) for p, a in zip(batch, answers)]


def _stream(cfg: AuditConfig, source, counter, journal: Journal, bar: tqdm, chosen: dict) -> int:
    """Fetch and count every bin still to do; returns how many were counted."""
    work = _todo(cfg, source, journal)
    fetching: dict[Future, str] = {}
    counting: dict[Future, list[_Photo]] = {}
    ready: list[_Photo] = []
    exhausted = False
    counted = 0
    buffer = cfg.batch_size * (counter.slots + 1)  # photos held in memory, at most, beyond downloads
    fetch_pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="audit-fetch")
    count_pool = ThreadPoolExecutor(counter.slots, thread_name_prefix="audit-count")
    try:
        while True:
            while not exhausted and len(fetching) < 2 * cfg.workers and len(ready) < buffer:
                item = next(work, None)
                if item is None:
                    exhausted = True
                else:
                    fetching[fetch_pool.submit(_fetch, source, *item, cfg)] = item[0]
            while len(counting) < counter.slots and (
                    len(ready) >= cfg.batch_size or (ready and exhausted and not fetching)):
                batch, ready = ready[:cfg.batch_size], ready[cfg.batch_size:]
                counting[count_pool.submit(_count, counter, batch, cfg, chosen)] = batch
            if not fetching and not counting:
                if exhausted and not ready:
                    break
                continue
            done, _ = wait([*fetching, *counting], return_when=FIRST_COMPLETED)
            for fut in done:
                if fut in fetching:
                    del fetching[fut]
                    got = fut.result()  # a SourceError here means the source is gone: stop
                    if isinstance(got, _Failed):
                        journal.fail(got.id, got.reason)
                    else:
                        ready.append(got)
                else:
                    batch = counting.pop(fut)
                    for row in fut.result():
                        if isinstance(row, _Failed):
                            journal.fail(row.id, row.reason)
                        else:
                            journal.add(row)
                            counted += 1
                    journal.commit()  # fsync: these bins are never counted again
                    bar.update(len(batch))
            journal.commit()
    finally:
        for fut in [*fetching, *counting]:
            fut.cancel()
        fetch_pool.shutdown(wait=True, cancel_futures=True)
        count_pool.shutdown(wait=True, cancel_futures=True)
        journal.commit()
    return counted


def audit(cfg: AuditConfig, out_dir: str | Path) -> AuditSummary:
    """Count every bin of ``cfg.source``, compare with the expected counts, write the outputs.

    Resumable: rerun with the same ``out_dir`` after a kill and only the bins not yet in the
    journal are fetched and counted. Raises AuditError when the source, the CSV or the server
    cannot be used (the journal keeps whatever was counted).
    """
    import mlflow
    from filelock import FileLock, Timeout

    from bincounter.evaluation import calibration
    from bincounter.paths import default_tracking_uri
    from bincounter.data.sources import SourceError

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tracking = cfg.tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    try:
        lock = FileLock(str(out / ".audit.lock"), timeout=0)
        lock.acquire()
    except Timeout:
        raise AuditError(f"another audit is writing to {out}") from None
    journal = Journal(out / JOURNAL)
    try:
        source = open_source(cfg.source, workers=cfg.workers, retries=cfg.retries)
        try:
            if cfg.expected_csv and isinstance(source, LocalSource):
                if not (source.root / IMAGES).is_dir():  # with a CSV, no metadata is needed
                    raise SourceError(f"{source.root} has no '{IMAGES}/' folder: not in the bucket's layout")
            else:
                source.check()
        except SourceError as exc:
            raise AuditError(str(exc)) from None
        counter = RemoteCounter(cfg.url, cfg) if cfg.url else _load_counter(cfg.model_uri)
        where = cfg.source.uri if cfg.source.is_s3 else str(Path(cfg.source.uri.removeprefix("file://")).resolve())
        csv_at = cfg.expected_csv if not cfg.expected_csv or "://" in cfg.expected_csv else str(
            Path(cfg.expected_csv).resolve())
        identity = {"counter": counter.name, "source": where, "expected_csv": csv_at or "metadata"}
        if isinstance(counter, RemoteCounter):  # a URL says nothing of what it serves: pin that too
            identity["served_model"] = counter.served
        journal.claim(identity)
        # The thresholds evaluation chose for this model, unless the config sets both.
        verdicts, verdicts_origin = calibration.load_verdicts(cfg.calibration, counter.pinned_uri)
        chosen = verdicts["chosen"] if verdicts else {}
        try:
            cfg.verdict.thresholds(chosen)
        except ValueError as exc:
            raise AuditError(f"the verdict thresholds do not fit the model's ({verdicts_origin}): {exc}; set both "
                             "--verdict.flag-threshold and --verdict.match-threshold") from None
        before = journal.counted()
        with tqdm(desc="audit", unit="bin", initial=before, disable=not cfg.progress, dynamic_ncols=True) as bar:
            try:
                counted = _stream(cfg, source, counter, journal, bar, chosen)
            except SourceError as exc:
                raise AuditError(f"{exc} ({journal.counted()} bins counted so far are kept; rerun to resume)") from None
        cal, origin = calibration.load(cfg.calibration, counter.pinned_uri)
        return write_outputs(journal, out, cfg, cal, origin, counter.name, counted, verdicts, verdicts_origin)
    finally:
        journal.close()
        lock.release()
