"""Preprocess on a deliberately messy ingest folder: every bad input is quarantined with its
reason and counted, nothing crashes, and the shards hold exactly the kept samples."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bincounter.data import validate as v
from bincounter.config import PreprocessConfig
from bincounter.data.dataset import read_samples, shard_urls
from bincounter.data.preprocess import _process_image, list_ids, load_dataset_info, preprocess
from bincounter.data.split import SPLITS
from bincounter_demo.synth import SynthConfig, generate

N_GOOD = 36
SIZE = 64  # the synthetic photos' size: they are stored as they are, others are resized


def _jpeg(size: tuple[int, int] = (96, 72), mode: str = "RGB", color=(120, 80, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 128).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _bomb(width: int, height: int) -> bytes:
    """A tiny JPEG whose frame header claims ``width`` x ``height`` pixels."""
    data = bytearray(_jpeg((16, 16)))
    sof = data.index(b"\xff\xc0")  # baseline frame: length(2) precision(1) height(2) width(2)
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _meta(count, items: dict | None = None) -> bytes:
    doc = {"EXPECTED_QUANTITY": count}
    if items is not None:
        doc["BIN_FCSKU_DATA"] = items
    return json.dumps(doc).encode()


def _item(quantity, **dims) -> dict:
    item = {"asin": "B000000000", "quantity": quantity, "name": "x"}
    for dim in ("height", "length", "width", "weight"):
        item[dim] = dims.get(dim, {"unit": "IN", "value": 1.0})
    return item


# id -> (image bytes or None for no file, metadata bytes or None, expected reason or None)
def _cases(good_image: bytes) -> dict[str, tuple[bytes | None, bytes | None, str | None]]:
    big = _jpeg((300, 200))
    return {
        "bad-empty": (b"", _meta(1, {"A": _item(1)}), v.EMPTY_FILE),
        "bad-truncated": (good_image[: len(good_image) * 6 // 10], _meta(1, {"A": _item(1)}), v.CORRUPT),
        "bad-truncated-big": (big[: len(big) // 2], _meta(1, {"A": _item(1)}), v.CORRUPT),
        "bad-header-cut": (good_image[:40], _meta(1, {"A": _item(1)}), v.CORRUPT),
        "bad-png": (_png(), _meta(1, {"A": _item(1)}), v.NOT_JPEG),
        "bad-garbage": (b"this is not a photo at all" * 20, _meta(1, {"A": _item(1)}), v.NOT_AN_IMAGE),
        "bad-bomb": (_bomb(30000, 30000), _meta(1, {"A": _item(1)}), v.TOO_LARGE),
        "bad-over-max-pixels": (_bomb(8000, 6000), _meta(1, {"A": _item(1)}), v.TOO_LARGE),
        "bad-no-image": (None, _meta(2, {"A": _item(2)}), v.MISSING_IMAGE),
        "bad-no-metadata": (_jpeg(), None, v.MISSING_METADATA),
        "bad-json": (_jpeg(), b'{"EXPECTED_QUANTITY": 2,', v.BAD_JSON),
        "bad-json-list": (_jpeg(), b"[1, 2]", v.BAD_JSON),
        "bad-no-quantity": (_jpeg(), json.dumps({"BIN_FCSKU_DATA": {}}).encode(), v.NO_QUANTITY),
        "bad-quantity-string": (_jpeg(), _meta("3", {"A": _item(3)}), v.NO_QUANTITY),
        "bad-quantity-float": (_jpeg(), _meta(3.0, {"A": _item(3)}), v.NO_QUANTITY),
        "bad-quantity-negative": (_jpeg(), _meta(-1, {}), v.NO_QUANTITY),
        "bad-out-of-range": (_jpeg(), _meta(9, {"A": _item(9)}), v.OUT_OF_RANGE),
        "bad-duplicate": (good_image, None, v.DUPLICATE),  # metadata copied from its twin below
        # Kept (a warning) with the default policy, dropped with on_inconsistent_quantity="drop".
        "warn-sum": (_jpeg(color=(10, 200, 10)), _meta(3, {"A": _item(1), "B": _item(1)}), v.INCONSISTENT),
        "warn-item-no-quantity": (_jpeg(color=(10, 10, 200)), _meta(2, {"A": _item(None)}), v.INCONSISTENT),
        "warn-empty-items": (_jpeg(color=(200, 10, 10)), _meta(2, {}), v.INCONSISTENT),
        # Fine: null dimensions are allowed, grayscale and larger photos are converted.
        "ok-null-dims": (_jpeg(color=(90, 90, 10)), _meta(1, {"A": _item(1, weight=None, height={"value": None})}), None),
        "ok-gray": (_jpeg((80, 80), mode="L"), _meta(2, {"A": _item(2)}), None),
        "ok-big": (big, _meta(4, {"A": _item(3), "B": _item(1)}), None),
        "ok-no-items-key": (_jpeg(color=(10, 90, 90)), _meta(5), None),
    }


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    generate(SynthConfig(n_images=N_GOOD, image_size=SIZE, seed=5), root)
    good_image = (root / "bin-images" / "00001.jpg").read_bytes()
    for id_, (image, meta, _) in _cases(good_image).items():
        if image is not None:
            (root / "bin-images" / f"{id_}.jpg").write_bytes(image)
        if meta is not None:
            (root / "metadata" / f"{id_}.json").write_bytes(meta)
    shutil.copy(root / "metadata" / "00001.json", root / "metadata" / "bad-duplicate.json")
    (root / "bin-images" / ".bad-empty.jpg.x1.part").write_bytes(b"left by a killed ingest")
    return root


@pytest.fixture(scope="module")
def cfg() -> PreprocessConfig:
    return PreprocessConfig(image_size=SIZE, workers=1, samples_per_class_in_report=2)


@pytest.fixture(scope="module")
def result(messy: Path, cfg: PreprocessConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "data"
    preprocess(cfg, messy, out, progress=False)
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_bad_input_is_quarantined_with_its_reason(messy, result):
    expected = {id_: reason for id_, (_, _, reason) in _cases(b"").items() if reason and id_ != "bad-duplicate"}
    records = {q["id"]: q for q in _jsonl(result / "quarantine.jsonl")}
    # Of two ids with the same bytes, the one later in the (fixed) hash order goes.
    dup = {"bad-duplicate", "00001"} & set(records)
    assert len(dup) == 1
    assert records[dup.pop()]["detail"] in ("same bytes as 00001", "same bytes as bad-duplicate")
    assert {i: q["reason"] for i, q in records.items() if i not in ("bad-duplicate", "00001")} == expected
    for id_, q in records.items():
        assert q.get("kept", False) == id_.startswith("warn-"), id_
    assert "items sum to 2" in records["warn-sum"]["detail"]
    assert "without a usable quantity: A" in records["warn-item-no-quantity"]["detail"]


def test_dataset_json_counts_each_reason(result):
    info = load_dataset_info(result)
    rejected = Counter(r for i, (_, _, r) in _cases(b"").items() if r and not i.startswith("warn-"))
    assert info["quarantined"] == dict(sorted(rejected.items()))
    assert info["warnings"] == {v.INCONSISTENT: 3}
    assert info["null_dimensions"] == 1
    kept = N_GOOD + 3 + 4  # synthetic + warnings kept + fine extras
    assert sum(info["sizes"].values()) == kept
    index = _jsonl(result / "index.jsonl")
    assert len(index) == kept
    assert not any(r["id"].startswith("bad-") and r["id"] != "bad-duplicate" for r in index)


def test_hidden_temp_files_are_not_data(messy):
    assert ".bad-empty.jpg.x1" not in list_ids(messy) and "bad-empty" in list_ids(messy)


def test_inconsistent_quantity_dropped_by_policy(messy, tmp_path):
    cfg = PreprocessConfig(image_size=SIZE, workers=1, on_inconsistent_quantity="drop", samples_per_class_in_report=0)
    preprocess(cfg, messy, tmp_path / "data", progress=False)
    info = load_dataset_info(tmp_path / "data")
    assert info["quarantined"][v.INCONSISTENT] == 3 and info["warnings"] == {}
    index_ids = {r["id"] for r in _jsonl(tmp_path / "data" / "index.jsonl")}
    assert not index_ids & {"warn-sum", "warn-item-no-quantity", "warn-empty-items"}


def test_shards_hold_exactly_the_index_with_correct_labels(messy, result, cfg):
    index = {r["id"]: r for r in _jsonl(result / "index.jsonl")}
    seen = {}
    for split in SPLITS:
        for key, jpg, label in read_samples(shard_urls(result, split)):
            assert index[key]["split"] == split
            count = json.loads((messy / "metadata" / f"{key}.json").read_text())["EXPECTED_QUANTITY"]
            assert label == index[key]["label"] == count - cfg.min_count
            with Image.open(io.BytesIO(jpg)) as img:
                assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (SIZE, SIZE))
            seen[key] = jpg
    assert sorted(seen) == sorted(index)
    # Photos already at the target size are stored byte for byte; others were resized.
    assert seen["00002"] == (messy / "bin-images" / "00002.jpg").read_bytes()
    assert index["ok-big"]["width"] == 300 and index["ok-big"]["height"] == 200


def test_the_test_photos_originals_are_kept_byte_for_byte(messy, result):
    """Evaluation scores the served path on these: the test split's photos as ingest fetched them,
    and no other split's (the dataset grows by a tenth of the originals, not all of them)."""
    from bincounter.data.preprocess import ORIGINALS

    index = {r["id"]: r for r in _jsonl(result / "index.jsonl")}
    kept = {p.stem: p for p in (result / ORIGINALS / "bin-images").iterdir()}
    assert sorted(kept) == sorted(i for i, r in index.items() if r["split"] == "test") and kept
    for id_, path in kept.items():
        assert path.read_bytes() == (messy / "bin-images" / f"{id_}.jpg").read_bytes()


def test_report_files(result):
    report = result / "report"
    for name in ("report.md", "report.html", "class_histogram.png", "image_sizes.png",
                 "quarantine_reasons.png", "samples_per_count.png"):
        assert (report / name).stat().st_size > 0, name
    md = (report / "report.md").read_text()
    assert v.DUPLICATE in md and f"{v.INCONSISTENT} (kept)" in md
    with Image.open(report / "samples_per_count.png") as img:
        assert img.format == "PNG"


def test_decompression_bomb_is_rejected_from_its_header():
    """Reason too_large, not a decode error: the header alone decided, no pixel was allocated."""
    start = time.monotonic()
    with pytest.raises(v.Invalid) as exc:
        v.open_checked(_bomb(30000, 30000), max_pixels=40_000_000)
    assert exc.value.reason == v.TOO_LARGE
    with pytest.raises(v.Invalid) as exc:
        v.open_checked(_jpeg((64, 64)), max_pixels=1000)  # a low limit applies to real photos too
    assert exc.value.reason == v.TOO_LARGE
    assert time.monotonic() - start < 1


def test_worker_reports_reasons_instead_of_raising(tmp_path):
    (tmp_path / "x.jpg").write_bytes(_bomb(20000, 20000))
    assert _process_image(str(tmp_path / "x.jpg"), 32, 10**8, 90)["reason"] == v.TOO_LARGE
    assert _process_image(str(tmp_path / "y.jpg"), 32, 10**8, 90)["reason"] == v.MISSING_IMAGE


@pytest.mark.parametrize(
    ("min_count", "overflow", "classes", "dropped"),
    [
        (0, "drop", ["0", "1", "2", "3", "4", "5"], {9}),
        (1, "drop", ["1", "2", "3", "4", "5"], {0, 9}),
        (0, "class", ["0", "1", "2", "3", "4", "5", "6+"], set()),
        (1, "class", ["1", "2", "3", "4", "5", "6+"], {0}),
    ],
)
def test_class_settings(tmp_path, min_count, overflow, classes, dropped):
    root = tmp_path / "in"
    for sub in ("bin-images", "metadata"):
        (root / sub).mkdir(parents=True)
    counts = {f"c{i:02d}": c for i, c in enumerate([0, 1, 2, 3, 4, 5, 6, 9, 12])}
    for id_, count in counts.items():
        (root / "bin-images" / f"{id_}.jpg").write_bytes(_jpeg(color=(count * 20, 50, 50)))
        (root / "metadata" / f"{id_}.json").write_bytes(_meta(count, {"A": _item(count)}))
    cfg = PreprocessConfig(image_size=32, max_count=5, min_count=min_count, overflow=overflow, workers=1,
                           samples_per_class_in_report=0)
    preprocess(cfg, root, tmp_path / "out", progress=False)
    info = load_dataset_info(tmp_path / "out")
    assert info["classes"] == classes == cfg.class_names() and len(classes) == cfg.num_classes
    index = {r["id"]: r for r in _jsonl(tmp_path / "out" / "index.jsonl")}
    for id_, count in counts.items():
        if count in dropped or (overflow == "drop" and count > 5):
            assert id_ not in index
        else:
            expected = classes.index(str(count)) if str(count) in classes else len(classes) - 1
            assert index[id_]["label"] == expected
    quarantined = Counter(q["reason"] for q in _jsonl(tmp_path / "out" / "quarantine.jsonl"))
    assert quarantined[v.OUT_OF_RANGE] == sum(1 for c in counts.values() if c not in range(min_count, 6)) - (
        sum(1 for c in counts.values() if c > 5) if overflow == "class" else 0)


def test_worker_pool_gives_byte_identical_output(tmp_path):
    """The parallel path (pool, chunks) writes the same shards as the inline one."""
    root = tmp_path / "in"
    generate(SynthConfig(n_images=80, image_size=48, seed=2), root)
    outs = []
    for workers in (1, 2):
        cfg = PreprocessConfig(image_size=32, workers=workers, shard_size=25, samples_per_class_in_report=0)
        preprocess(cfg, root, tmp_path / f"w{workers}", progress=False)
        outs.append(tmp_path / f"w{workers}")
    info = load_dataset_info(outs[0])
    assert info["shards"] == load_dataset_info(outs[1])["shards"]
    assert len(info["shards"]["train"]) >= 2  # shards roll over at shard_size
    for shard in [s for split in SPLITS for s in info["shards"][split]]:
        assert (outs[0] / shard).read_bytes() == (outs[1] / shard).read_bytes()
    assert not (tmp_path / "w1.partial").exists()


def test_a_manifest_id_that_is_not_a_file_name_is_quarantined_and_never_read(tmp_path):
    """An ingest manifest naming '../../outside' must not pull in files from outside the folder
    (nor write '../../outside.jpg' into a shard, where it would escape an extracting folder)."""
    raw = tmp_path / "raw"
    generate(SynthConfig(n_images=8, image_size=SIZE, seed=3), raw)
    shutil.copy(raw / "bin-images" / "00001.jpg", tmp_path / "outside.jpg")  # where '../../outside' points
    (tmp_path / "outside.json").write_bytes(_meta(1, {"A": _item(1)}))
    ids = [p.stem for p in (raw / "metadata").glob("*.json")] + ["../../outside", "/tmp/x"]
    (raw / "manifest.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    out = tmp_path / "data"
    preprocess(PreprocessConfig(image_size=SIZE, workers=1), raw, out, progress=False)
    quarantine = {q["id"]: q["reason"] for q in _jsonl(out / "quarantine.jsonl")}
    assert quarantine == {"../../outside": v.INVALID_ID, "/tmp/x": v.INVALID_ID}
    assert "outside" not in (out / "index.jsonl").read_text()
    kept = [key for split in SPLITS for key, _, _ in read_samples(shard_urls(out, split))]
    assert sorted(kept) == sorted(ids[:8])


# A preprocess that SIGKILLs itself right after its k-th folder operation (rename, exchange or
# delete) once the new dataset is complete: the moments at which it replaces the old dataset.
KILL_AFTER_OP = """
import os, shutil, signal, sys
from bincounter import fileio
from bincounter.data import preprocess as pp
from bincounter.config import PreprocessConfig

in_dir, out_dir, size, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if sys.argv[5] == "fallback":  # a file system without an atomic exchange
    fileio._exchange = lambda a, b: False
state = {"armed": False, "ops": 0}
real_report = pp.write_data_report

def report(*args, **kwargs):
    result = real_report(*args, **kwargs)
    state["armed"] = True  # the new dataset is complete beside the old one
    return result

def killing(fn):
    def op(*args, **kwargs):
        result = fn(*args, **kwargs)
        if state["armed"]:
            state["ops"] += 1
            if state["ops"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return result
    return op

pp.write_data_report = report
os.replace, os.rename, shutil.rmtree = killing(os.replace), killing(os.rename), killing(shutil.rmtree)
if hasattr(fileio, "_exchange"):
    fileio._exchange = killing(fileio._exchange)
pp.preprocess(PreprocessConfig(image_size=size, workers=1), in_dir, out_dir, progress=False)
"""


def _dataset_size(out: Path) -> int | None:
    """The image size of the complete, readable dataset at ``out``; None if there is none."""
    try:
        info = load_dataset_info(out)
        for split in SPLITS:
            assert len(read_samples(shard_urls(out, split))) == info["sizes"][split]
    except (OSError, ValueError, AssertionError):
        return None
    return info["image_size"]


@pytest.mark.slow
@pytest.mark.parametrize("swap", ["exchange", "fallback"])
def test_a_preprocess_killed_while_replacing_its_output_leaves_a_whole_dataset(tmp_path, swap):
    """With an atomic exchange the dataset is whole after a kill at any point; without one (the
    fallback renames the old folder aside first) the old one is put back by the next run's first step."""
    import subprocess
    import sys

    from bincounter.fileio import recover_dir

    raw = tmp_path / "raw"
    generate(SynthConfig(n_images=24, image_size=SIZE, seed=9), raw)
    out = tmp_path / "data"
    preprocess(PreprocessConfig(image_size=32, workers=1), raw, out, progress=False)  # the old dataset
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    kills = 0
    for kill_at in range(1, 10):
        proc = subprocess.run([sys.executable, "-c", KILL_AFTER_OP, str(raw), str(out), "48", str(kill_at), swap],
                              env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            break  # fewer folder operations than kill_at: it finished
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        kills += 1
        if swap == "fallback":
            recover_dir(out)
        assert _dataset_size(out) in (32, 48), f"no whole dataset after a kill at folder operation {kill_at}"
        # A rerun after the kill replaces whatever is there with a whole new dataset.
        preprocess(PreprocessConfig(image_size=32, workers=1), raw, out, progress=False)
        assert _dataset_size(out) == 32
    assert kills >= 1 and proc.returncode == 0
    assert _dataset_size(out) == 48
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".data", "data."))]  # nothing beside it


def test_each_sample_carries_its_items_figures_for_auxiliary_targets(tmp_path):
    """The json member holds the count and what the items add up to; a figure that cannot be
    trusted (missing, another unit, negative) is null, never guessed."""
    from bincounter.data.dataset import AUX_TARGETS, aux_targets

    root = tmp_path / "in"
    for sub in ("bin-images", "metadata"):
        (root / sub).mkdir(parents=True)
    cm = {"unit": "CM", "value": 2.0}
    metas = {
        "full": {"A": _item(2, height={"unit": "IN", "value": 2.0}, weight={"unit": "pounds", "value": 0.5}),
                 "B": _item(1, length={"unit": "IN", "value": 3.0}, weight={"unit": "pounds", "value": 1.0})},
        "no-weight": {"A": _item(1, weight=None)},
        "centimetres": {"A": _item(1, height=cm)},
        "negative": {"A": _item(1, width={"unit": "IN", "value": -1.0})},
        "empty": {},
    }
    for n, (id_, items) in enumerate(metas.items()):
        (root / "bin-images" / f"{id_}.jpg").write_bytes(_jpeg(color=(n * 40, 80, 80)))  # duplicates are dropped
        (root / "metadata" / f"{id_}.json").write_bytes(_meta(sum(i["quantity"] for i in items.values()), items))
    preprocess(PreprocessConfig(image_size=32, workers=1, val_fraction=0.0, test_fraction=0.0,
                                samples_per_class_in_report=0), root, tmp_path / "out", progress=False)
    meta = {s[0]: s[3] for s in read_samples(shard_urls(tmp_path / "out", "train"), with_meta=True)}
    assert meta["full"] == {"id": "full", "count": 3, "label_source": "metadata", "products": 2,
                            "volume_in3": 2 * 2.0 + 1 * 3.0, "weight_lb": 2 * 0.5 + 1 * 1.0}
    assert meta["no-weight"]["weight_lb"] is None and meta["no-weight"]["volume_in3"] == 1.0
    assert meta["centimetres"]["volume_in3"] is None
    assert meta["negative"]["volume_in3"] is None
    assert meta["empty"] == {"id": "empty", "count": 0, "label_source": "metadata", "products": 0, "volume_in3": 0.0,
                             "weight_lb": 0.0}
    assert meta["centimetres"]["weight_lb"] is None  # _item's default weight is in inches: not a weight
    targets = aux_targets([meta[i] for i in ("full", "no-weight")])
    assert targets.shape == (2, len(AUX_TARGETS))
    assert targets[0, 0] == np.float32(np.log1p(3)) and np.isnan(targets[1, 3])
