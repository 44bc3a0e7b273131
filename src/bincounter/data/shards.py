"""Scale-out of the data stages: ingest and preprocess run once per shard of the id space
(``split.shard_of``), and :func:`merge` joins the preprocessed shards into the dataset one
unsharded preprocess makes: same samples in the same order and tar shards, duplicates across
shards quarantined by the same rule, the same input manifest (hence its hash) and split.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from bincounter.data import bounded
from bincounter.data import validate as v
from bincounter.config import PreprocessConfig
from bincounter.fileio import atomic_write
from bincounter.ids import is_file_stem
from bincounter.data.preprocess import (DATASET_JSON, INPUT_MANIFEST, ORIGINALS, ORIGINALS_OF, PreprocessResult, Sample,
                                   _dataset_info, _ShardWriter, _write_jsonl, duplicate_detail, duplicate_of,
                                   load_dataset_info, order_key)
from bincounter.data.sources import IMAGES
from bincounter.data.report import write_data_report
from bincounter.data.split import SPLITS


def shard_indices(shards: int) -> list[int]:
    """The shard numbers a pipeline fans out over."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    return list(range(shards))


def _jsonl(path: Path, cfg: PreprocessConfig) -> list[dict]:
    """A shard's own index or quarantine lines; a line that breaks the limits or is not JSON
    fails the merge (ValueError): dropping it would lose a sample or its record."""
    if not path.exists():
        return []
    rows = []
    for _, row in bounded.json_lines(path, max_bytes=cfg.max_metadata_bytes, max_depth=cfg.max_json_depth):
        if isinstance(row, ValueError):
            raise ValueError(f"cannot merge {path}: {row}")
        rows.append(row)
    return rows


def _tar_samples(files: list[Path]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of each sample of a split's tar files, in the order written."""
    for path in files:
        with tarfile.open(path) as tar:
            key, members = None, {}
            for member in tar:
                name, _, ext = member.name.rpartition(".")
                if key is not None and name != key:
                    yield key, members
                    members = {}
                key = name
                members[ext] = tar.extractfile(member).read()
            if key is not None:
                yield key, members


def merge(cfg: PreprocessConfig, parts: list[str | Path], out_dir: str | Path) -> PreprocessResult:
    """Join preprocessed shards (made with ``cfg``) into ``out_dir``; atomic like preprocess."""
    parts, out_dir = [Path(p) for p in parts], Path(out_dir)
    if not parts:
        raise ValueError("no preprocessed shards to merge")
    infos = [load_dataset_info(p) for p in parts]
    for path, info in zip(parts, infos):
        if PreprocessConfig(**info["config"]) != cfg:
            raise ValueError(f"{path} was preprocessed with other settings than the merge's")
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)

    rows: list[dict] = []
    part_of: dict[str, Path] = {}  # the shard that packed each photo
    for p in parts:
        for row in _jsonl(p / "index.jsonl", cfg):
            rows.append(row)
            part_of[row["id"]] = p
    rows.sort(key=lambda r: order_key(r["id"], cfg))
    quarantine: list[dict] = []
    sha_of = {r["id"]: r["sha256"] for r in rows}
    # The rule of preprocess: the first copy of a photo in the processing order is kept.
    first_of: dict[str, str] = {}
    kept: list[dict] = []
    for row in rows:
        first = first_of.setdefault(row["sha256"], row["id"])
        if first != row["id"]:
            quarantine.append({"id": row["id"], "reason": v.DUPLICATE, "detail": duplicate_detail(first)})
        else:
            kept.append(row)
    for p in parts:
        for record in _jsonl(p / "quarantine.jsonl", cfg):
            if record["reason"] == v.DUPLICATE:  # name the copy kept in the whole, not in the shard
                record["detail"] = duplicate_detail(first_of[sha_of[duplicate_of(record["detail"])]])
            quarantine.append(record)
    kept_ids = {r["id"] for r in kept}

    per_label: Counter[int] = Counter()
    example_ids: set[str] = set()
    for row in kept:
        if per_label[row["label"]] < cfg.samples_per_class_in_report:
            per_label[row["label"]] += 1
            example_ids.add(row["id"])
    by_id = {r["id"]: r for r in kept}
    examples: dict[str, list[tuple[Sample, bytes]]] = {s: [] for s in SPLITS}
    shards: dict[str, list[str]] = {}
    for split in SPLITS:
        writer = _ShardWriter(tmp_dir / split, cfg.shard_size)
        streams = [_tar_samples([p / name for name in info["shards"][split]]) for p, info in zip(parts, infos)]
        for key, members in heapq.merge(*streams, key=lambda item: order_key(item[0], cfg)):
            if key not in kept_ids:
                continue
            writer.write(key, members)
            if key in example_ids:
                examples[split].append((Sample(**by_id[key]), members["jpg"]))
        shards[split] = writer.close()

    _copy_originals(kept, part_of, tmp_dir / ORIGINALS / IMAGES)
    index = sorted(kept, key=lambda r: r["id"])
    _write_jsonl(tmp_dir / "index.jsonl", index)
    quarantine.sort(key=lambda q: (q["id"], q["reason"]))
    _write_jsonl(tmp_dir / "quarantine.jsonl", quarantine)
    manifest = _merged_manifest(parts, cfg)
    atomic_write(tmp_dir / INPUT_MANIFEST, manifest)
    dataset = _dataset_info(cfg, hashlib.sha256(manifest).hexdigest() if manifest else None,
                            infos[0].get("ingest_config"), index, quarantine,
                            sum(bool(r.get("null_dims")) for r in kept), shards)
    atomic_write(tmp_dir / DATASET_JSON, json.dumps(dataset, indent=2).encode())
    write_data_report(tmp_dir, index, quarantine, examples, cfg)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp_dir, out_dir)
    return PreprocessResult(out_dir=out_dir, sizes=dataset["sizes"], quarantined=dataset["quarantined"],
                            classes=cfg.class_names(), shards=shards)


def _copy_originals(kept: list[dict], part_of: dict[str, Path], folder: Path) -> None:
    """The kept test photos' originals, from the shard that packed each (a shard made before
    preprocess kept them has none: evaluation then needs the ingest output)."""
    folder.mkdir(parents=True)
    for row in kept:
        if row["split"] not in ORIGINALS_OF or not is_file_stem(row["id"]):
            continue
        source = part_of[row["id"]] / ORIGINALS / IMAGES / f"{row['id']}.jpg"
        if source.is_file():
            shutil.copyfile(source, folder / source.name)


def _merged_manifest(parts: list[Path], cfg: PreprocessConfig) -> bytes:
    """The shards' ingest manifests as the unsharded ingest writes its own: one line per id,
    sorted by id (so the bytes, and the hash lineage records, are the same). Lines that name
    no id, as preprocess skips them in its input manifest, are left out."""
    lines: dict[str, bytes] = {}
    for p in parts:
        path = p / INPUT_MANIFEST
        if path.exists():
            for line, entry in bounded.json_lines(path, max_bytes=cfg.max_metadata_bytes, max_depth=cfg.max_json_depth):
                if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                    lines[entry["id"]] = line.rstrip(b"\r\n")
    return b"".join(lines[i] + b"\n" for i in sorted(lines))
