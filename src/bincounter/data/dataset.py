"""Read the packed shards written by preprocess into PyTorch datasets and loaders."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, RandomSampler

from bincounter.model.transforms import decode_bytes

# Decoded photos are cached as uint8 tensors while they fit in this many bytes; beyond it,
# JPEG bytes are kept and decoded per sample (in DataLoader workers).
DECODED_CACHE_BYTES = 6 * 2**30


CACHE_INDEX = ".bincounter-etags.json"  # in a cached copy: relative path -> ETag of the object it holds


def materialize(data_dir: str | Path, cache: str | Path | None = None) -> Path:
    """A local folder for a preprocessed dataset: the folder itself, or for ``s3://bucket/prefix``
    a cached copy.

    The copy is keyed on content, not size: each file is fetched again unless it came from an
    object with the ETag the listing shows now (and is fetched with ``IfMatch`` on that ETag),
    and files whose objects are gone are deleted. A dataset regenerated at the same URI so
    replaces the old one whole, even where a new shard has an old one's size.
    """
    text = str(data_dir)
    if not text.startswith("s3://"):
        return Path(data_dir)
    import hashlib
    import os

    import boto3

    from bincounter.fileio import atomic_write
    from bincounter.ids import safe_join

    bucket, _, prefix = text[len("s3://"):].partition("/")
    prefix = prefix.strip("/") + "/"
    root = Path(cache or os.environ.get("BINCOUNTER_CACHE", Path.home() / ".cache" / "bincounter"))
    local = root / hashlib.sha256(text.encode()).hexdigest()[:16]
    index_path = local / CACHE_INDEX
    held: dict[str, str] = json.loads(index_path.read_text()) if index_path.exists() else {}
    client = boto3.client("s3")  # endpoint and credentials from the usual AWS_* settings
    listed: dict[str, tuple[str, str]] = {}  # relative path -> (key, ETag)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            relative = obj["Key"][len(prefix):]
            if not relative or relative.endswith("/") or relative == CACHE_INDEX:
                continue  # a "folder" marker (or our own index's name), not a file of the dataset
            safe_join(local, relative, what=f"key {obj['Key']!r} in {text}: relative path")
            listed[relative] = (obj["Key"], obj["ETag"])
    stale = [r for r in held if listed.get(r, (None, None))[1] != held[r]]
    todo = [r for r in listed if held.get(r) != listed[r][1] or not (local / r).exists()]
    # Forget what is about to change before changing it: a kill mid-way then never leaves an
    # entry vouching for a file that holds something else.
    for relative in stale:
        del held[relative]
    atomic_write(index_path, json.dumps(held, sort_keys=True).encode())
    try:
        for relative in stale:
            if relative not in listed:
                (local / relative).unlink(missing_ok=True)
        for relative in todo:
            key, etag = listed[relative]
            body = client.get_object(Bucket=bucket, Key=key, IfMatch=etag)["Body"].read()
            atomic_write(local / relative, body)
            held[relative] = etag
    finally:
        atomic_write(index_path, json.dumps(held, sort_keys=True).encode())
    if not (local / "dataset.json").exists():
        raise FileNotFoundError(f"{text} holds no dataset.json: not a preprocess output")
    return local


def shard_urls(data_dir: str | Path, split: str) -> list[str]:
    """Local shard paths of one split, as listed in ``dataset.json``."""
    info = json.loads((Path(data_dir) / "dataset.json").read_text())
    return [str(Path(data_dir) / s) for s in info["shards"][split]]


def read_samples(urls: list[str], with_meta: bool = False) -> list[tuple]:
    """(id, jpeg bytes, label) for every sample in the shards, in shard order; with ``with_meta``
    a fourth element, the sample's json member (count and item figures, see preprocess).

    Every caller reads every shard: under DDP each rank holds the whole split and a
    DistributedSampler divides it (webdataset's default node splitter refuses to run there).
    """
    out = []
    if not urls:  # an empty split (val_fraction=0): webdataset refuses an empty shard list
        return out
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None,
                                 workersplitter=None):
        row = (sample["__key__"], sample["jpg"], int(sample["cls"]))
        if with_meta:
            row += (json.loads(sample["json"]) if "json" in sample else {},)
        out.append(row)
    return out


# Auxiliary regression targets read from each sample's json member, as log(1 + x): the exact item
# count (also above the largest class), distinct products, total item volume and weight.
AUX_TARGETS = ("count", "products", "volume_in3", "weight_lb")


def aux_targets(metas: list[dict]) -> np.ndarray:
    """(N, len(AUX_TARGETS)) float32 array of log1p figures; NaN where a figure is absent."""
    out = np.full((len(metas), len(AUX_TARGETS)), np.nan, dtype=np.float32)
    for i, meta in enumerate(metas):
        for j, key in enumerate(AUX_TARGETS):
            value = meta.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                out[i, j] = np.log1p(value)
    return out


class ShardDataset(Dataset):
    """A split held in memory: decoded once when it fits, else as JPEG bytes."""

    def __init__(self, samples: list[tuple], transform: Callable[[torch.Tensor], torch.Tensor],
                 cache_bytes: int = DECODED_CACHE_BYTES, extras: dict[str, np.ndarray] | None = None):
        self.ids = [s[0] for s in samples]
        self.labels = torch.tensor([s[2] for s in samples], dtype=torch.long)
        # Per-sample training targets beside the label, one row per sample ("aux": the metadata's
        # figures, "teacher": a teacher's probabilities); when any, items are (image, label, {name: row}).
        self.extras: dict[str, torch.Tensor] = {}
        for name, rows in (extras or {}).items():
            self.add_extra(name, rows)
        self.transform = transform
        # (seeded?, the epoch's seed), in shared memory: persistent DataLoader workers, started
        # with a copy of this dataset, see what seed_augmentations sets for each new epoch.
        self._seed = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._decoded: list[torch.Tensor] | None = None
        self._jpegs = [s[1] for s in samples]
        if samples:
            first = decode_bytes(samples[0][1])
            if first.numel() * len(samples) <= cache_bytes:
                self._decoded = [decode_bytes(b) for b in self._jpegs]
                self._jpegs = []

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> torch.Tensor:
        return self._decoded[i] if self._decoded is not None else decode_bytes(self._jpegs[i])

    def add_extra(self, name: str, rows: np.ndarray | torch.Tensor) -> None:
        rows = torch.as_tensor(rows, dtype=torch.float32)
        if len(rows) != len(self.labels):
            raise ValueError(f"{name}: {len(rows)} rows for {len(self.labels)} samples")
        self.extras[name] = rows

    def _item(self, x: torch.Tensor, i: int) -> tuple:
        if not self.extras:
            return x, self.labels[i]
        return x, self.labels[i], {name: rows[i] for name, rows in self.extras.items()}

    def seed_augmentations(self, seed: int) -> None:
        """From now on (in every DataLoader worker too), the transform's random draws for a batch
        come from (``seed``, the batch's first sample index), not from whatever state the process's
        random generator is in: a worker that ran earlier epochs and a new one draw the same."""
        self._seed.copy_(torch.tensor([1, seed]))

    def _transform(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if not self._seed[0]:
            return self.transform(x)
        seed = np.random.SeedSequence([int(self._seed[1]) % 2**64, index]).generate_state(1, np.uint64)[0]
        # The CPU generator alone (manual_seed would reseed CUDA's too), restored afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            return self.transform(x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self._item(self._transform(self.image(i), i), i)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A whole batch (DataLoader calls this instead of ``__getitem__`` per sample): images of
        one size go through a ``batched`` transform together, which on CPU is many times cheaper
        than one call per image. Returns per-sample pairs, so any ``collate_fn`` still works."""
        images = [self.image(i) for i in indices]
        if getattr(self.transform, "batched", False) and len({im.shape for im in images}) == 1:
            # The first index names the batch: a sampler draws each index once per epoch.
            out = self._transform(torch.stack(images), indices[0]).unbind(0)
        else:
            out = [self._transform(im, i) for im, i in zip(images, indices)]
        return [self._item(x, i) for x, i in zip(out, indices)]


def load_split(data_dir: str | Path, split: str, transform: Callable, with_targets: bool = False) -> ShardDataset:
    """One split as a dataset; ``with_targets`` adds the auxiliary targets (``aux_targets``) as extra "aux"."""
    samples = read_samples(shard_urls(data_dir, split), with_meta=with_targets)
    extras = {"aux": aux_targets([s[3] for s in samples])} if with_targets else None
    return ShardDataset(samples, transform, extras=extras)


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, workers: int, pin_memory: bool,
                sampler=None, seed: int = 0, drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    if shuffle and sampler is None:
        # Its own generator: the loader's also draws the workers' base seed, but only when they
        # start, so sharing it would shuffle a resumed run's first epoch unlike an uninterrupted one.
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        generator=generator,
        drop_last=drop_last,
    )


def seed_epoch(loader: DataLoader, seed: int) -> None:
    """Make an epoch of ``loader`` a function of ``seed``: the shuffle and the augmentations
    (``ShardDataset.seed_augmentations``). It then comes out the same whether the loader's
    persistent workers have run earlier epochs or are new, as after a resume."""
    loader.generator.manual_seed(seed)
    if isinstance(loader.sampler, RandomSampler) and loader.sampler.generator is not None:
        loader.sampler.generator.manual_seed(seed)
    if isinstance(loader.dataset, ShardDataset):
        loader.dataset.seed_augmentations(seed)
