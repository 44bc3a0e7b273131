"""Preprocess: validate, clean, split, resize once, and pack into webdataset shards.

Input: an ingest folder (``bin-images/``, ``metadata/``, ``manifest.jsonl``).
Output folder:
    train/ val/ test/   shard-000000.tar ... (``<id>.jpg`` resized, ``<id>.cls`` label, ``<id>.json``)
    index.jsonl         one line per kept sample: id, count, label, split, original size, sha256
    input_manifest.jsonl  the ingest manifest this was made from (shards merge into the whole's)
    originals/bin-images/  the test photos' original bytes, as ingest fetched them: evaluation
                        scores them as the model server would, with no need for the ingest output
    quarantine.jsonl    one line per rejected sample: id, reason, detail
    dataset.json        classes, image size, sizes per split, shards, hash of the input manifest
    report/             PNG plots and report.md (see bincounter.data.report)
Nothing from the input is modified or lost: a rejected sample is listed with its reason. Nothing
outside the input folder is read (a symlink out of it, a FIFO or a device is quarantined unread),
and metadata is parsed only within the size and nesting limits (``bounded``).

Photos are streamed: workers check and resize them in a fixed pseudo-random order (a hash of
the id), and each result goes straight into its split's current shard. Memory stays flat
whatever the dataset's size, and each shard is already shuffled across classes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import reprlib
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from bincounter.data import bounded
from bincounter.data import validate as v
from bincounter.config import PreprocessConfig
from bincounter.fileio import atomic_write, recover_dir, replace_dir
from bincounter.ids import is_file_stem
from bincounter.data.ingest import MANIFEST
from bincounter.data.reviews import FROM_METADATA, FROM_REVIEW, LABEL_SOURCE
from bincounter.data.report import write_data_report  # at the top: forked workers inherit matplotlib
from bincounter.data.sources import IMAGES, METADATA
from bincounter.data.split import SPLITS, label_of, split_of, unit_hash

log = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
INPUT_MANIFEST = "input_manifest.jsonl"
ORIGINALS = "originals"  # the test split's original photos, in the bucket's layout (ORIGINALS/IMAGES/<id>.jpg)
ORIGINALS_OF = ("test",)
_DUPLICATE = "same bytes as "


def duplicate_detail(first: str) -> str:
    return _DUPLICATE + first


def duplicate_of(detail: str) -> str:
    """The id a duplicate record names as the copy that was kept."""
    return detail.removeprefix(_DUPLICATE)


def order_key(id_: str, cfg: PreprocessConfig) -> tuple[float, str]:
    """The order photos are processed and packed in: a hash of the id (ties by id)."""
    return unit_hash(id_, cfg.split_salt + ":order"), id_


@dataclass(frozen=True)
class Sample:
    id: str
    count: int
    label: int
    split: str
    width: int
    height: int
    consistent: bool
    sha256: str = ""  # of the original photo: duplicates are found by it, also across shards
    null_dims: bool = False
    label_source: str = FROM_METADATA  # FROM_REVIEW: the count is a person's (bincounter review), not the record's


@dataclass
class PreprocessResult:
    out_dir: Path
    sizes: dict[str, int]
    quarantined: dict[str, int]
    classes: list[str]
    shards: dict[str, list[str]] = field(default_factory=dict)


def _visible(names: list[str], suffix: str) -> list[str]:
    # Hidden names are temporary files (.x.part) or OS litter (macOS ._x.jpg), never data.
    return [n[: -len(suffix)] for n in names if n.endswith(suffix) and not n.startswith(".")]


def list_ids(in_dir: Path, rejected: list[dict] | None = None, cfg: PreprocessConfig = PreprocessConfig()) -> list[str]:
    """Ids from the manifest when there is one, plus both folders (catching orphans).

    A manifest id that is not a plain file name (``../../x``, ``/etc/x``) is never read: it
    goes to ``rejected`` as a quarantine record instead.
    """
    manifest = in_dir / MANIFEST
    ids: set[str] = set()
    if manifest.exists():
        for _, entry in bounded.json_lines(manifest, max_bytes=cfg.max_metadata_bytes, max_depth=cfg.max_json_depth):
            if isinstance(entry, bounded.Refused):
                log.warning("%s (skipped: its id, if any, is still found in the folders)", entry)
            if not isinstance(entry, dict) or "id" not in entry:
                continue  # a line cut short by a killed ingest names nothing reliable
            id_ = entry["id"]
            if is_file_stem(id_):
                ids.add(id_)
            elif rejected is not None:
                # Shortened: a record must stay within the limits merge_shards reads it back with.
                rejected.append({"id": str(id_)[:200], "reason": v.INVALID_ID,
                                 "detail": f"{MANIFEST} names {reprlib.repr(id_)}, which is not a file name"})
    for sub, suffix in ((IMAGES, ".jpg"), (METADATA, ".json")):
        folder = in_dir / sub
        if folder.is_dir():
            ids.update(_visible(os.listdir(folder), suffix))
    return sorted(ids)


def reviewed_labels(in_dir: Path, cfg: PreprocessConfig = PreprocessConfig()) -> dict[str, tuple[int, str]]:
    """Bins ingest labelled with a person's count (``label_source: "review"`` in the manifest):
    id -> (count, sha256 of the photo the person counted)."""
    manifest = in_dir / MANIFEST
    found: dict[str, tuple[int, str]] = {}
    if not manifest.exists():
        return found
    for _, entry in bounded.json_lines(manifest, max_bytes=cfg.max_metadata_bytes, max_depth=cfg.max_json_depth):
        if (isinstance(entry, dict) and entry.get(LABEL_SOURCE) == FROM_REVIEW and is_file_stem(entry.get("id"))
                and type(entry.get("count")) is int and entry["count"] >= 0 and isinstance(entry.get("sha256"), str)):
            found[entry["id"]] = (entry["count"], entry["sha256"])
    return found


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Resize the whole photo to size x size: no crop, so no item at the edge is cut away.

    Bilinear with antialiasing, the filter serving's ``T.Resize(antialias=True)`` applies
    (torchvision matches PIL's), so trained-on and served pixels agree; it is also a third
    cheaper than bicubic, the largest cost of an original photo after decoding it.
    """
    return img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)


def _encode(img: Image.Image, data: bytes, size: int, quality: int) -> bytes:
    """The stored JPEG: the original bytes when the photo already is what training wants
    (saves a decode-encode round and its generation loss), else resized and re-encoded."""
    if img.size == (size, size) and img.mode == "RGB":
        v.verify_decodes(img)
        return data
    small = resize_square(v.decode(img, target=size), size)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _process_image(path: str, size: int, max_pixels: int, quality: int, keep_original: bool = False,
                   root: str | None = None) -> dict:
    """Check and resize one photo: ``jpg``/``width``/``height``/``sha256`` (and with
    ``keep_original`` the bytes read, as ``original``), or ``reason``/``detail``. Nothing
    outside ``root`` (default: the photo's folder) is read."""
    try:
        data = bounded.read_file(path, root=root or os.path.dirname(path))
    except FileNotFoundError:
        return {"reason": v.MISSING_IMAGE, "detail": path}
    except bounded.Refused as exc:
        return {"reason": v.refusal(exc).reason, "detail": str(exc)[:300]}
    except OSError as exc:  # an unreadable file where the photo should be
        return {"reason": v.NOT_AN_IMAGE, "detail": f"cannot read {path}: {exc}"}
    try:
        img = v.open_checked(data, max_pixels)
        width, height = img.size
        jpg = _encode(img, data, size, quality)
    except v.Invalid as exc:
        return {"reason": exc.reason, "detail": exc.detail[:300]}
    out = {"jpg": jpg, "width": width, "height": height, "sha256": hashlib.sha256(data).hexdigest()}
    if keep_original:
        out["original"] = data
    return out


def _read_json(path: Path, cfg: PreprocessConfig) -> dict | None:
    """A JSON file of the input folder, or None when absent; bounded.Refused (a ValueError,
    failing the job: it describes the whole folder) when it breaks the limits."""
    if not path.exists():
        return None
    raw = bounded.read_file(path, root=path.parent, max_bytes=cfg.max_metadata_bytes)
    return bounded.loads(raw, max_bytes=cfg.max_metadata_bytes, max_depth=cfg.max_json_depth, what=str(path))


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_sample_metadata(id_: str, meta_path: str, cfg: PreprocessConfig, root: str | None = None,
                          person_count: int | None = None) -> tuple[v.MetadataInfo | None, list[dict]]:
    """One id's metadata when the sample may be kept (else None), and its quarantine records.

    An inconsistent count is recorded either way; with ``on_inconsistent_quantity="keep"``
    the record carries ``kept: true`` and counts as a warning, not a rejection. Nothing outside
    ``root`` (default: the file's folder) is read. ``person_count``, a reviewed bin's count,
    replaces the record's (whose disagreement with its items then no longer matters).
    """
    try:
        raw = bounded.read_file(meta_path, root=root or os.path.dirname(meta_path), max_bytes=cfg.max_metadata_bytes)
        info = v.check_metadata(raw, max_bytes=cfg.max_metadata_bytes, max_depth=cfg.max_json_depth)
    except FileNotFoundError:
        return None, [{"id": id_, "reason": v.MISSING_METADATA, "detail": meta_path}]
    except bounded.Refused as exc:
        return None, [{"id": id_, "reason": v.refusal(exc).reason, "detail": str(exc)[:300]}]
    except OSError as exc:
        return None, [{"id": id_, "reason": v.BAD_JSON, "detail": f"cannot read {meta_path}: {exc}"}]
    except v.Invalid as exc:
        return None, [{"id": id_, "reason": exc.reason, "detail": exc.detail[:300]}]
    records = []
    if person_count is not None:
        info = replace(info, count=person_count, items_quantity=None, bad_quantities=())
    if not info.consistent:
        keep = cfg.on_inconsistent_quantity == "keep"
        records.append({"id": id_, "reason": v.INCONSISTENT, "detail": info.describe_inconsistency()[:300], "kept": keep})
        if not keep:
            return None, records
    if label_of(info.count, cfg) is None:
        return None, records + [{"id": id_, "reason": v.OUT_OF_RANGE, "detail": f"count {info.count}"}]
    return info, records


def items_summary(info: v.MetadataInfo) -> dict:
    """What the metadata says about the items besides their count (the sample's json member):
    training's auxiliary targets. Absent figures are null."""
    return {"products": info.n_items if info.items_quantity is not None else None,
            "volume_in3": info.items_volume_in3, "weight_lb": info.items_weight_lb}


# Set once per worker process (and in this one for the inline path), so a job is just an id.
_JOB: dict = {}


def _init_worker(cfg: PreprocessConfig, in_dir: str, reviewed: dict[str, tuple[int, str]]) -> None:
    _JOB.update(cfg=cfg, root=in_dir, images=os.path.join(in_dir, IMAGES, ""), metadata=os.path.join(in_dir, METADATA, ""),
                reviewed=reviewed)


def _process_sample(id_: str) -> tuple[str, dict]:
    """Worker: check one id's metadata, then its photo (only if the metadata may be kept).

    Returns (id, result): ``result["records"]`` holds its quarantine records; a sample to
    keep also has ``jpg``, ``width``, ``height``, ``sha256``, ``count``, ``consistent``
    and ``null_dims`` (and ``original``, the bytes read, for a test photo). Metadata is
    checked here, not up front, so it is spread over the workers and overlaps with decoding
    instead of running alone before it.
    """
    cfg = _JOB["cfg"]
    person_count, counted_sha256 = _JOB["reviewed"].get(id_, (None, None))
    meta = _JOB["metadata"] + id_ + ".json"
    info, records = check_sample_metadata(id_, meta, cfg, _JOB["root"], person_count)
    if info is None:
        return id_, {"records": records}
    image = _process_image(_JOB["images"] + id_ + ".jpg", cfg.image_size, cfg.max_pixels, cfg.jpeg_quality,
                           keep_original=split_of(id_, cfg) in ORIGINALS_OF, root=_JOB["root"])
    if "reason" in image:
        return id_, {"records": records + [{"id": id_, **image}]}
    source = FROM_REVIEW if person_count is not None else FROM_METADATA
    if person_count is not None and image["sha256"] != counted_sha256:
        # Not the photo the person counted: the record's count, as if nobody had.
        source = FROM_METADATA
        info, records = check_sample_metadata(id_, meta, cfg, _JOB["root"])
        records.append({"id": id_, "reason": "review_of_another_photo", "kept": True,
                        "detail": "the photo is not the one the person counted: the record's count is kept"})
        if info is None:
            return id_, {"records": records}
    return id_, {"records": records, **image, "count": info.count, "consistent": info.consistent,
                 "null_dims": info.null_dimensions, "items": items_summary(info), LABEL_SOURCE: source}


def _header_template() -> tuple[bytearray, int]:
    # Every member's header is the same but for name, size and checksum: build the rest once.
    header = bytearray(tarfile.BLOCKSIZE)
    header[100:108] = b"0000444\0"  # mode
    header[108:116] = header[116:124] = b"0000000\0"  # uid, gid
    header[136:148] = b"00000000000\0"  # mtime
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[156:157] = tarfile.REGTYPE
    header[257:265] = tarfile.POSIX_MAGIC  # b"ustar\x0000"
    return header, sum(header)


_HEADER, _HEADER_SUM = _header_template()


def _ustar_header(name: str, size: int) -> bytes:
    """A regular file's 512-byte ustar header (mode 0444, owner 0, mtime 0).

    Byte for byte what tarfile.TarInfo.tobuf gives, at a fraction of its cost (which was
    more than checking a photo); tarfile still handles names over 100 bytes.
    """
    raw = name.encode()
    if len(raw) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o444, 0
        return info.tobuf(tarfile.PAX_FORMAT)
    header = _HEADER.copy()
    size_field = b"%011o\0" % size
    header[0:len(raw)] = raw
    header[124:136] = size_field
    header[148:156] = b"%06o\0 " % (_HEADER_SUM + sum(raw) + sum(size_field))
    return bytes(header)


class _ShardWriter:
    """Appends samples to ``shard-NNNNNN.tar`` files of at most ``shard_size`` samples.

    Plain ustar members named ``<id>.<ext>``, which is all webdataset reads; modification
    times are fixed so the same input gives byte-identical shards.
    """

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.names: list[str] = []
        self._file = None
        self._in_shard = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if self._file is None or self._in_shard == self.shard_size:
            self._roll()
        parts = []
        for ext in sorted(members):
            data = members[ext]
            parts += (_ustar_header(f"{key}.{ext}", len(data)), data, b"\0" * (-len(data) % tarfile.BLOCKSIZE))
        self._file.write(b"".join(parts))
        self._in_shard += 1

    def _roll(self) -> None:
        self._close_shard()
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{len(self.names):06d}.tar"
        self._file = (self.folder / name).open("wb")
        self.names.append(f"{self.folder.name}/{name}")
        self._in_shard = 0

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
            self._file.close()
            self._file = None

    def close(self) -> list[str]:
        self._close_shard()
        self.folder.mkdir(parents=True, exist_ok=True)  # an empty split still has its folder
        return self.names


def _worker_pool(cfg: PreprocessConfig, in_dir: Path, workers: int, n_ids: int) -> ProcessPoolExecutor | None:
    """Worker processes for checking photos and drawing the report, or None to work inline."""
    args = (cfg, str(in_dir), reviewed_labels(in_dir, cfg))
    if workers <= 1 or n_ids < 64:  # a pool costs more than it saves on a handful of photos
        _init_worker(*args)
        return None
    return ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=args)


def _processed(ids: list[str], pool: ProcessPoolExecutor | None, workers: int,
               progress: bool) -> Iterator[tuple[str, dict]]:
    """Results of ``_process_sample`` in ``ids`` order, from the pool's ``workers`` processes (or inline)."""
    bar = {"total": len(ids), "desc": "preprocess", "unit": "img", "disable": not progress}
    if pool is None:
        return tqdm(map(_process_sample, ids), **bar)
    # Chunks amortise the inter-process round trip; a few per worker keep the tail short.
    chunksize = max(1, min(64, len(ids) // (8 * workers)))
    return tqdm(pool.map(_process_sample, ids, chunksize=chunksize), **bar)


def preprocess(cfg: PreprocessConfig, in_dir: str | Path, out_dir: str | Path,
               progress: bool = True) -> PreprocessResult:
    """Run every check, split, resize and pack. Writes into a folder beside ``out_dir`` and swaps
    it into place, so a killed run leaves the previous dataset or the new one, never neither."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    recover_dir(out_dir)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)

    rejected: list[dict] = []
    ids = list_ids(in_dir, rejected, cfg)
    if not ids:
        raise ValueError(f"{in_dir} holds no photos or metadata in the bucket's layout")

    # A hash order is a shuffle that stays put when the dataset grows, and it decides which
    # copy of a duplicated photo is kept.
    order = sorted(ids, key=lambda i: order_key(i, cfg))
    writers = {s: _ShardWriter(tmp_dir / s, cfg.shard_size) for s in SPLITS}
    originals = tmp_dir / ORIGINALS / IMAGES
    originals.mkdir(parents=True)
    examples: dict[str, list[tuple[Sample, bytes]]] = {s: [] for s in SPLITS}
    per_label: Counter[int] = Counter()
    index: list[dict] = []
    quarantine: list[dict] = rejected
    seen_hash: dict[str, str] = {}
    null_dims = 0
    workers = cfg.workers or os.cpu_count() or 1
    pool = _worker_pool(cfg, in_dir, workers, len(order))
    try:
        for id_, res in _processed(order, pool, workers, progress):
            quarantine += res["records"]
            if "jpg" not in res:
                continue
            first = seen_hash.setdefault(res["sha256"], id_)
            if first != id_:
                quarantine.append({"id": id_, "reason": v.DUPLICATE, "detail": duplicate_detail(first)})
                continue
            sample = Sample(id=id_, count=res["count"], label=label_of(res["count"], cfg), split=split_of(id_, cfg),
                            width=res["width"], height=res["height"], consistent=res["consistent"],
                            sha256=res["sha256"], null_dims=bool(res["null_dims"]), label_source=res[LABEL_SOURCE])
            writers[sample.split].write(id_, {"jpg": res["jpg"], "cls": str(sample.label).encode(),
                                              "json": json.dumps({"id": id_, "count": sample.count,
                                                                  LABEL_SOURCE: sample.label_source,
                                                                  **res["items"]}).encode()})
            index.append(dict(vars(sample)))  # flat: asdict's deep copy cost more than the write
            if "original" in res:
                (originals / f"{id_}.jpg").write_bytes(res["original"])
            null_dims += bool(res["null_dims"])
            if per_label[sample.label] < cfg.samples_per_class_in_report:  # only these stay in memory
                per_label[sample.label] += 1
                examples[sample.split].append((sample, res["jpg"]))
        shards = {s: w.close() for s, w in writers.items()}

        index.sort(key=lambda r: r["id"])
        _write_jsonl(tmp_dir / "index.jsonl", index)
        quarantine.sort(key=lambda q: (q["id"], q["reason"]))
        _write_jsonl(tmp_dir / "quarantine.jsonl", quarantine)
        manifest = in_dir / MANIFEST
        if manifest.exists():
            shutil.copyfile(manifest, tmp_dir / INPUT_MANIFEST)
        dataset = _dataset_info(cfg, _file_sha256(manifest) if manifest.exists() else None,
                                _read_json(in_dir / "ingest_config.json", cfg), index, quarantine, null_dims, shards)
        atomic_write(tmp_dir / DATASET_JSON, json.dumps(dataset, indent=2).encode())
        # The idle workers draw the report's plots side by side.
        write_data_report(tmp_dir, index, quarantine, examples, cfg, executor=pool)
    finally:
        for w in writers.values():
            w.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    replace_dir(tmp_dir, out_dir)
    return PreprocessResult(out_dir=out_dir, sizes=dataset["sizes"], quarantined=dataset["quarantined"],
                            classes=cfg.class_names(), shards=shards)


def _dataset_info(cfg: PreprocessConfig, manifest_sha256: str | None, ingest_config: dict | None,
                  index: list[dict], quarantine: list[dict], null_dims: int, shards: dict[str, list[str]]) -> dict:
    """The contents of ``dataset.json``: what the trainer and the lineage records read."""
    names = cfg.class_names()
    kept = {r["id"] for r in index}
    per_split = Counter(r["split"] for r in index)
    per_class = Counter((r["split"], r["label"]) for r in index)
    return {
        "classes": names,
        "min_count": cfg.min_count,
        "max_count": cfg.max_count,
        "overflow": cfg.overflow,
        "image_size": cfg.image_size,
        "sizes": {s: per_split[s] for s in SPLITS},
        "class_counts": {s: {n: per_class[s, i] for i, n in enumerate(names)} for s in SPLITS},
        "shards": shards,
        # Rejections by reason; "warnings" are kept samples with a recorded doubt.
        "quarantined": dict(sorted(Counter(q["reason"] for q in quarantine if not q.get("kept")).items())),
        "warnings": dict(sorted(Counter(q["reason"] for q in quarantine if q.get("kept") and q["id"] in kept).items())),
        "null_dimensions": null_dims,  # kept samples with an item's dimension or weight null
        # Labels that are people's counts (bincounter review), per split: the floor's own photos.
        "reviewed_labels": {s: sum(1 for r in index if r["split"] == s and r.get(LABEL_SOURCE) == FROM_REVIEW)
                            for s in SPLITS},
        "input_manifest_sha256": manifest_sha256,
        "ingest_config": ingest_config,
        "config": cfg.model_dump(),
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def load_dataset_info(data_dir: str | Path) -> dict:
    """``dataset.json`` of a preprocessed folder."""
    return json.loads((Path(data_dir) / DATASET_JSON).read_text())


def dataset_params(info: dict) -> dict:
    """The ingest and preprocess settings behind a dataset (its ``dataset.json``), as the dotted
    params a training run logs."""
    from bincounter.config import IngestConfig

    params = {f"preprocess.{k}": v for k, v in PreprocessConfig(**info["config"]).flat().items()}
    if info.get("ingest_config"):
        params.update({f"ingest.{k}": v for k, v in IngestConfig(**info["ingest_config"]).flat().items()})
    params.update({"data.sizes": info["sizes"], "data.input_manifest_sha256": info["input_manifest_sha256"],
                   "data.reviewed_labels": info.get("reviewed_labels") or {}})
    return params


REVIEWED_COLUMNS = ("id", "split", "count", "record_count", "reviewers", "counts", "latest", "models", "review_sha256",
                    "review_source")


def reviewed_lineage(data_dir: str | Path) -> list[dict]:
    """Where each person-given label of a dataset came from: its bin, split, the person's and the
    record's counts, who answered, when, for which model, and the reviews object and its sha256
    (from the ingest manifest the dataset keeps); kept samples only, sorted by id."""
    data_dir = Path(data_dir)
    index, manifest = data_dir / "index.jsonl", data_dir / INPUT_MANIFEST
    if not index.exists() or not manifest.exists():
        return []
    cfg = PreprocessConfig()
    split = {r["id"]: r["split"] for _, r in bounded.json_lines(index, max_bytes=cfg.max_metadata_bytes,
                                                                 max_depth=cfg.max_json_depth)
             if isinstance(r, dict) and r.get(LABEL_SOURCE) == FROM_REVIEW}
    rows = []
    for _, e in bounded.json_lines(manifest, max_bytes=cfg.max_metadata_bytes, max_depth=cfg.max_json_depth):
        if isinstance(e, dict) and e.get("id") in split and isinstance(e.get("review"), dict):
            review = e["review"]
            rows.append({"id": e["id"], "split": split[e["id"]], "count": e.get("count"),
                         "record_count": e.get("record_count"), "reviewers": " ".join(review.get("reviewers", [])),
                         "counts": " ".join(map(str, review.get("counts", []))), "latest": review.get("latest"),
                         "models": " ".join(review.get("models", [])), "review_sha256": review.get("sha256"),
                         "review_source": review.get("source")})
    return sorted(rows, key=lambda r: r["id"])
