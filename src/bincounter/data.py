"""Read the packed shards written by preprocess into PyTorch datasets and loaders."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

from bincounter.transforms import decode_bytes

# Decoded photos are cached as uint8 tensors while they fit in this many bytes; beyond it,
# JPEG bytes are kept and decoded per sample (in DataLoader workers).
DECODED_CACHE_BYTES = 6 * 2**30


def shard_urls(data_dir: str | Path, split: str) -> list[str]:
    """Shard paths (or URLs) of one split, as listed in ``dataset.json``."""
    data_dir = str(data_dir).rstrip("/")
    if data_dir.startswith("s3://"):
        info = json.loads(_read_s3(f"{data_dir}/dataset.json"))
        # webdataset streams a shard from any command's stdout.
        return [f"pipe:aws s3 cp {data_dir}/{s} -" for s in info["shards"][split]]
    info = json.loads((Path(data_dir) / "dataset.json").read_text())
    return [str(Path(data_dir) / s) for s in info["shards"][split]]


def _read_s3(uri: str) -> bytes:
    import boto3

    bucket, _, key = uri[len("s3://"):].partition("/")
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def read_samples(urls: list[str]) -> list[tuple[str, bytes, int]]:
    """(id, jpeg bytes, label) for every sample in the shards, in shard order."""
    out = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        out.append((sample["__key__"], sample["jpg"], int(sample["cls"])))
    return out


class ShardDataset(Dataset):
    """A split held in memory: decoded once when it fits, else as JPEG bytes."""

    def __init__(self, samples: list[tuple[str, bytes, int]], transform: Callable[[torch.Tensor], torch.Tensor],
                 cache_bytes: int = DECODED_CACHE_BYTES):
        self.ids = [s[0] for s in samples]
        self.labels = torch.tensor([s[2] for s in samples], dtype=torch.long)
        self.transform = transform
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

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.image(i)), self.labels[i]


def load_split(data_dir: str | Path, split: str, transform: Callable) -> ShardDataset:
    return ShardDataset(read_samples(shard_urls(data_dir, split)), transform)


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, workers: int, pin_memory: bool,
                sampler=None, seed: int = 0, drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        generator=generator,
        drop_last=drop_last,
    )
