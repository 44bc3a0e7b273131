"""Preprocess: validate, clean, split, resize once, and pack into webdataset shards.

Input: an ingest folder (``bin-images/``, ``metadata/``, ``manifest.jsonl``).
Output folder:
    train/ val/ test/   shard-000000.tar ... (``<id>.jpg`` resized, ``<id>.cls`` label, ``<id>.json``)
    index.jsonl         one line per kept sample: id, count, label, split, original size
    quarantine.jsonl    one line per rejected sample: id, reason, detail
    dataset.json        classes, image size, sizes per split, shards, hash of the input manifest
    report/             PNG plots and report.md (see bincounter.report)
Nothing from the input is modified or lost: a rejected sample is listed with its reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from bincounter import validate as v
from bincounter.config import PreprocessConfig
from bincounter.ingest import MANIFEST, atomic_write
from bincounter.sources import IMAGES, METADATA
from bincounter.split import SPLITS, label_of, split_of

DATASET_JSON = "dataset.json"


@dataclass(frozen=True)
class Sample:
    id: str
    count: int
    label: int
    split: str
    width: int
    height: int
    consistent: bool


@dataclass
class PreprocessResult:
    out_dir: Path
    sizes: dict[str, int]
    quarantined: dict[str, int]
    classes: list[str]
    shards: dict[str, list[str]] = field(default_factory=dict)


def list_ids(in_dir: Path) -> list[str]:
    """Ids from the manifest when there is one, else from both folders (catching orphans)."""
    manifest = in_dir / MANIFEST
    ids: set[str] = set()
    if manifest.exists():
        for line in manifest.read_text().splitlines():
            if line.strip():
                ids.add(json.loads(line)["id"])
    for sub, suffix in ((IMAGES, ".jpg"), (METADATA, ".json")):
        folder = in_dir / sub
        if folder.is_dir():
            ids.update(n[: -len(suffix)] for n in os.listdir(folder) if n.endswith(suffix))
    return sorted(ids)


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Resize the whole photo to size x size: no crop, so no item at the edge is cut away."""
    return img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)


def _process_image(args: tuple[str, str, int, int, int]) -> tuple[str, dict]:
    """Worker: check and resize one photo. Returns (id, result) where result has either
    ``jpg``/``width``/``height``/``sha256`` or ``reason``/``detail``."""
    id_, path, size, max_pixels, quality = args
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return id_, {"reason": v.MISSING_IMAGE, "detail": path}
    try:
        img = v.open_checked(data, max_pixels)
        width, height = img.size
        small = resize_square(v.decode(img, target=size), size)
    except v.Invalid as exc:
        return id_, {"reason": exc.reason, "detail": exc.detail[:300]}
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    return id_, {"jpg": buf.getvalue(), "width": width, "height": height,
                 "sha256": hashlib.sha256(data).hexdigest()}


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def preprocess(cfg: PreprocessConfig, in_dir: str | Path, out_dir: str | Path,
               progress: bool = True) -> PreprocessResult:
    """Run every check, split, resize and pack. Writes into a temporary folder first and
    renames it into place, so a killed run leaves no half-written dataset."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)

    quarantine: list[dict] = []
    metas: dict[str, v.MetadataInfo] = {}
    ids = list_ids(in_dir)
    if not ids:
        raise ValueError(f"{in_dir} holds no photos or metadata in the bucket's layout")

    for id_ in ids:
        meta_path = in_dir / METADATA / f"{id_}.json"
        if not meta_path.exists():
            quarantine.append({"id": id_, "reason": v.MISSING_METADATA, "detail": str(meta_path)})
            continue
        try:
            info = v.check_metadata(meta_path.read_bytes())
        except v.Invalid as exc:
            quarantine.append({"id": id_, "reason": exc.reason, "detail": exc.detail[:300]})
            continue
        if not info.consistent:
            detail = f"EXPECTED_QUANTITY={info.count}, items sum to {info.items_quantity}"
            quarantine_it = cfg.on_inconsistent_quantity == "drop"
            record = {"id": id_, "reason": v.INCONSISTENT, "detail": detail, "kept": not quarantine_it}
            quarantine.append(record)
            if quarantine_it:
                continue
        metas[id_] = info

    jobs = [(id_, str(in_dir / IMAGES / f"{id_}.jpg"), cfg.image_size, cfg.max_pixels, cfg.jpeg_quality)
            for id_ in metas if label_of(metas[id_].count, cfg) is not None]
    out_of_range = [id_ for id_ in metas if label_of(metas[id_].count, cfg) is None]
    quarantine += [{"id": i, "reason": v.OUT_OF_RANGE, "detail": f"count {metas[i].count}"} for i in out_of_range]

    samples: dict[str, list[tuple[Sample, bytes]]] = {s: [] for s in SPLITS}
    seen_hash: dict[str, str] = {}
    workers = cfg.workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_process_image, jobs, chunksize=16)
        for id_, res in tqdm(results, total=len(jobs), desc="preprocess", unit="img", disable=not progress):
            if "reason" in res:
                quarantine.append({"id": id_, **res})
                continue
            first = seen_hash.setdefault(res["sha256"], id_)
            if first != id_:
                quarantine.append({"id": id_, "reason": v.DUPLICATE, "detail": f"same bytes as {first}"})
                continue
            info = metas[id_]
            sample = Sample(id=id_, count=info.count, label=label_of(info.count, cfg), split=split_of(id_, cfg),
                            width=res["width"], height=res["height"], consistent=info.consistent)
            samples[sample.split].append((sample, res["jpg"]))

    shards: dict[str, list[str]] = {}
    rng = random.Random(cfg.split_salt)
    for split, items in samples.items():
        # Shuffle once so each shard mixes classes; streaming readers then need a small buffer.
        rng.shuffle(items)
        shards[split] = _write_shards(tmp_dir / split, items, cfg.shard_size)

    index = [asdict(s) for split in SPLITS for s, _ in samples[split]]
    _write_jsonl(tmp_dir / "index.jsonl", sorted(index, key=lambda r: r["id"]))
    _write_jsonl(tmp_dir / "quarantine.jsonl", quarantine)
    manifest = in_dir / MANIFEST
    sizes = {s: len(samples[s]) for s in SPLITS}
    reasons = Counter(q["reason"] for q in quarantine if not q.get("kept"))
    dataset = {
        "classes": cfg.class_names(),
        "min_count": cfg.min_count,
        "max_count": cfg.max_count,
        "overflow": cfg.overflow,
        "image_size": cfg.image_size,
        "sizes": sizes,
        "class_counts": {s: _class_hist(samples[s], cfg) for s in SPLITS},
        "shards": shards,
        "quarantined": dict(sorted(reasons.items())),
        "warnings": dict(Counter(q["reason"] for q in quarantine if q.get("kept"))),
        "input_manifest_sha256": _file_sha256(manifest) if manifest.exists() else None,
        "config": cfg.model_dump(),
    }
    atomic_write(tmp_dir / DATASET_JSON, json.dumps(dataset, indent=2).encode())

    from bincounter.report import write_data_report  # matplotlib is slow to import; only here

    write_data_report(tmp_dir, index, quarantine, samples, cfg)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp_dir, out_dir)
    return PreprocessResult(out_dir=out_dir, sizes=sizes, quarantined=dict(reasons),
                            classes=cfg.class_names(), shards=shards)


def _class_hist(items: list[tuple[Sample, bytes]], cfg: PreprocessConfig) -> dict[str, int]:
    names = cfg.class_names()
    hist = Counter(names[s.label] for s, _ in items)
    return {n: hist.get(n, 0) for n in names}


def _write_shards(folder: Path, items: list[tuple[Sample, bytes]], shard_size: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for start in range(0, max(len(items), 1), shard_size):
        chunk = items[start:start + shard_size]
        if not chunk:
            break
        name = f"shard-{start // shard_size:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for sample, jpg in chunk:
                sink.write({"__key__": sample.id, "jpg": jpg, "cls": sample.label,
                            "json": {"id": sample.id, "count": sample.count}})
        names.append(f"{folder.name}/{name}")
    return names


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def load_dataset_info(data_dir: str | Path) -> dict:
    """``dataset.json`` of a preprocessed folder."""
    return json.loads((Path(data_dir) / DATASET_JSON).read_text())
