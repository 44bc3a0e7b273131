"""Splits by id hash: fixed, proportional, independent of the count, stable as data grows."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bincounter.config import PreprocessConfig
from bincounter.data.preprocess import preprocess
from bincounter.data.split import label_of, split_of, unit_hash
from bincounter_demo.synth import SynthConfig, generate


def test_split_is_a_pure_function_of_id_and_salt():
    cfg = PreprocessConfig()
    # Pinned: a change here would silently move photos between train and test everywhere.
    ids = [f"{i:05d}" for i in range(1, 41)]
    assert {i: split_of(i, cfg) for i in ids if split_of(i, cfg) != "train"} == {
        "00010": "val", "00011": "test", "00018": "val", "00034": "val"}
    assert (round(unit_hash("00523", "bincounter"), 6), round(unit_hash("523", "bincounter"), 6)) == (0.364011, 0.218683)
    other = PreprocessConfig(split_salt="other")
    assert [split_of(i, cfg) for i in ids] != [split_of(i, other) for i in ids]


@pytest.mark.parametrize(("val", "test"), [(0.1, 0.1), (0.2, 0.05), (0.0, 0.0)])
def test_split_proportions(val, test):
    cfg = PreprocessConfig(val_fraction=val, test_fraction=test)
    n = 20_000
    share = Counter(split_of(f"{i:06d}", cfg) for i in range(n))
    for split, expected in (("train", 1 - val - test), ("val", val), ("test", test)):
        assert abs(share[split] / n - expected) < 0.01


def test_fractions_must_leave_training_data():
    with pytest.raises(ValueError):
        PreprocessConfig(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError):
        PreprocessConfig(min_count=3, max_count=2)


def test_labels():
    drop = PreprocessConfig(max_count=5)
    assert [label_of(c, drop) for c in range(8)] == [0, 1, 2, 3, 4, 5, None, None]
    one = PreprocessConfig(max_count=5, min_count=1, overflow="class")
    assert [label_of(c, one) for c in range(8)] == [None, 0, 1, 2, 3, 4, 5, 5]
    assert one.class_names() == ["1", "2", "3", "4", "5", "6+"] and one.num_classes == 6


def test_splits_are_stable_when_the_dataset_grows(tmp_path: Path):
    """Preprocess 40 photos, then the same 40 plus 40 new ones: no old photo changes split,
    so a test photo never becomes a training photo in a later dataset version."""
    root = tmp_path / "in"
    generate(SynthConfig(n_images=40, image_size=32, seed=4), root)
    cfg = PreprocessConfig(image_size=32, workers=1, samples_per_class_in_report=0)
    preprocess(cfg, root, tmp_path / "v1", progress=False)
    generate(SynthConfig(n_images=80, image_size=32, seed=4), root)  # extends: ids 1..40 unchanged
    preprocess(cfg, root, tmp_path / "v2", progress=False)

    def splits(folder: Path) -> dict[str, str]:
        rows = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
        return {r["id"]: r["split"] for r in rows}

    v1, v2 = splits(tmp_path / "v1"), splits(tmp_path / "v2")
    assert len(v1) == 40 and len(v2) == 80
    assert {i: v2[i] for i in v1} == v1
