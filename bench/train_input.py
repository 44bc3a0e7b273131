"""Does the input pipeline keep up with training? End-to-end training throughput against the
model alone.

Three ways to feed the same resnet18 (torchvision, no pretrained weights, 112 px, batch 32,
AdamW, channels_last as train.py uses on CPU), in one process, the same number of steps each:

* in-memory: batches already transformed and held in memory (the model's own speed);
* bincounter: ``ShardDataset`` + ``make_loader`` + ``TrainTransform``, as ``train()`` builds them;
* ImageFolder: torchvision ``ImageFolder`` over the same photos written as JPEG files, with PIL
  transforms (RandomResizedCrop, flip, ToTensor, Normalize): the textbook loader.

Data: synthetic photos (``bincounter_demo.synth.generate``), ingested from a folder and preprocessed
at 128 px into a temporary folder, all splits pooled (this measures speed, not accuracy).

With DataLoader workers at 0 (what train.py picks on a 2-core CPU) the pipelines are interleaved
step by step, so load from other processes hits all three alike; with workers > 0 they run one
after the other (interleaving would let workers prefetch during the other pipelines' steps).
Note that on a 2-core machine DataLoader workers compete with the model for the same cores.

    .venv/bin/python bench/train_input.py [--threads N] [--workers N] [--steps 15]

Throughput is batch size / median step time (a step: getting the batch plus forward, backward,
optimizer step), robust to load spikes from other processes; the mean-based figure is printed too.
The last line is ``ratio: X.XX (goal >= 0.95)``: bincounter throughput / in-memory throughput.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms as TV

from bincounter.config import IngestConfig, PreprocessConfig, SourceConfig
from bincounter_demo.synth import SynthConfig
from bincounter.data.dataset import ShardDataset, make_loader, read_samples, seed_epoch, shard_urls
from bincounter.model.networks import IMAGENET_MEAN, IMAGENET_STD
from bincounter.model.transforms import TrainTransform


def build_dataset(root: Path, n_images: int, prep_size: int) -> Path:
    from bincounter.data.ingest import ingest
    from bincounter.data.preprocess import preprocess
    from bincounter_demo.synth import generate

    generate(SynthConfig(n_images=n_images, seed=3), root / "synth")
    ingest(IngestConfig(source=SourceConfig(uri=str(root / "synth")), progress=False), root / "raw")
    preprocess(PreprocessConfig(image_size=prep_size, workers=1), root / "raw", root / "data", progress=False)
    return root / "data"


def write_image_folder(samples: list[tuple[str, bytes, int]], root: Path) -> Path:
    for key, jpeg, label in samples:
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{key.replace('/', '_')}.jpg").write_bytes(jpeg)
    return root


def batches(loader):
    """Endless batches: a new pass over the loader whenever one ends."""
    while True:
        yield from loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--prep-size", type=int, default=128, help="preprocess size (stored JPEGs)")
    ap.add_argument("--size", type=int, default=112, help="training input size")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, for all pipelines")
    ap.add_argument("--workers", type=int, default=min(2, max(0, (os.cpu_count() or 1) - 2)),
                    help="DataLoader workers for both loaders (default: train.py's rule on CPU)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="bench-train-input-") as tmp:
        t0 = time.perf_counter()
        data = build_dataset(Path(tmp), args.images, args.prep_size)
        samples = read_samples([u for split in ("train", "val", "test") for u in shard_urls(data, split)])
        folder = write_image_folder(samples, Path(tmp) / "imagefolder")
        setup = time.perf_counter() - t0

        ours = make_loader(ShardDataset(samples, TrainTransform(size=args.size, mean=IMAGENET_MEAN, std=IMAGENET_STD)),
                           batch_size=args.batch, shuffle=True, workers=args.workers, pin_memory=False, drop_last=True)
        seed_epoch(ours, 0)  # as train() does each epoch: augmentations seeded per batch
        pil = TV.Compose([TV.RandomResizedCrop(args.size, scale=(0.8, 1.0)), TV.RandomHorizontalFlip(),
                          TV.ToTensor(), TV.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        folder_loader = DataLoader(torchvision.datasets.ImageFolder(str(folder), transform=pil), batch_size=args.batch,
                                   shuffle=True, num_workers=args.workers, persistent_workers=args.workers > 0,
                                   drop_last=True)
        n = args.warmup + args.steps
        memory = list(itertools.islice(batches(ours), n))  # made before any timing

        model = torchvision.models.resnet18(num_classes=6).to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(images: torch.Tensor, target: torch.Tensor) -> None:
            images = images.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(images), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        feeds = {"in-memory": iter(memory), "bincounter": batches(ours), "ImageFolder": batches(folder_loader)}
        seconds: dict[str, list[float]] = {k: [] for k in feeds}  # per timed step: batch + train step
        data_seconds: dict[str, list[float]] = {k: [] for k in feeds}  # per timed step: waiting for the batch

        def run(name: str, i: int) -> None:
            t = time.perf_counter()
            images, target = next(feeds[name])
            t_data = time.perf_counter()
            step(images, target)
            if i >= args.warmup:
                seconds[name].append(time.perf_counter() - t)
                data_seconds[name].append(t_data - t)

        names = list(feeds)
        t0 = time.perf_counter()
        if args.workers == 0:
            for i in range(n):  # interleaved, the order rotating so no pipeline always goes first
                for name in names[i % 3:] + names[:i % 3]:
                    run(name, i)
        else:
            for name in names:
                for i in range(n):
                    run(name, i)
        timed = time.perf_counter() - t0

    # Throughput from the median step (robust to load spikes from other processes on a shared
    # machine); the mean-based figure is printed beside it.
    rate = {k: args.batch / statistics.median(v) for k, v in seconds.items()}
    mean_rate = {k: args.batch * len(v) / sum(v) for k, v in seconds.items()}
    mode = "interleaved step by step" if args.workers == 0 else "one after the other"
    print(f"data: {args.images} synthetic photos (bincounter_demo.synth) -> ingest from folder -> preprocess at "
          f"{args.prep_size} px, all splits ({len(samples)} images); setup {setup:.0f} s")
    print(f"model: resnet18 (torchvision, pretrained none), {args.size} px, batch {args.batch}, AdamW, channels_last; "
          f"{args.steps} timed steps after {args.warmup} warm-up per pipeline, {mode}; torch threads {args.threads}, "
          f"DataLoader workers {args.workers}; timed part {timed:.0f} s")
    for name, label in (("in-memory", "in-memory tensors (model alone)"),
                        ("bincounter", "bincounter ShardDataset+make_loader+TrainTransform"),
                        ("ImageFolder", "torchvision ImageFolder+PIL transforms")):
        ms = 1000 * statistics.median(data_seconds[name])
        print(f"{label:52s} {rate[name]:6.1f} images/s (mean-based {mean_rate[name]:5.1f}; waiting for data "
              f"{ms:5.1f} ms/batch)" + ("" if name == "in-memory" else f"  ratio vs in-memory {rate[name] / rate['in-memory']:.2f}"))
    print(f"ratio: {rate['bincounter'] / rate['in-memory']:.2f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
