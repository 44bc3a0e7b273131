"""Labels and splits: which class a count falls in, and which split an id belongs to."""

from __future__ import annotations

import hashlib

from bincounter.config import PreprocessConfig

SPLITS = ("train", "val", "test")


def label_of(count: int, cfg: PreprocessConfig) -> int | None:
    """Class index of a count, or None when the configuration drops it."""
    if count < cfg.min_count:
        return None
    if count <= cfg.max_count:
        return count - cfg.min_count
    return cfg.max_count - cfg.min_count + 1 if cfg.overflow == "class" else None


def unit_hash(id_: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by the id alone."""
    digest = hashlib.sha256(f"{salt}:{id_}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(id_: str, cfg: PreprocessConfig) -> str:
    """Assign a split from a hash of the id, so it never changes when the dataset grows.

    The hash is independent of the count, so every class is split in the configured
    proportions (stratified in expectation; the report shows the realised per-class split).
    A relabelled id keeps its split, so a fixed label never leaks a photo across splits.
    """
    u = unit_hash(id_, cfg.split_salt)
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def shard_of(id_: str, shards: int) -> int:
    """Which of ``shards`` data shards an id belongs to: a hash of the id alone, so every
    shard gets an even share of the id space whatever the listing order."""
    return min(int(unit_hash(id_, "shard") * shards), shards - 1)
