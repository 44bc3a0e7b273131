"""The full-data recipe's per-image costs, measured on this CPU (docs/recipe.md).

One CPU thread for everything (``torch.set_num_threads(1)``), timed in CPU time of this process
rather than wall time: each figure is per core, and other work on a shared machine slows the
run (run it under ``nice``) without changing its figures much. Per image, at ``--size`` px:

* preprocess: an original photo decoded (draft mode), resized whole and re-encoded as JPEG, as
  ``bincounter.data.preprocess`` stores it; also the stored JPEG's size (it sets training's memory);
* input: a stored JPEG decoded and augmented with ``TrainTransform`` in batches, what one
  DataLoader worker does;
* model: one training step (forward, backward, AdamW; channels_last; ``freeze_early`` at
  ``TrainConfig``'s default) of each backbone, and its FLOPs per image (the forward counted by
  ``torch.utils.flop_counter``, the backward taken as twice the forward of the layers that
  train). Also at 224 px, the size of the measured CPU training runs, and EfficientNet-B0 at
  224 px with nothing frozen: the model of the published GPU figures the estimate scales from.

Photos: the originals (not 224 px copies) of ../shared/abid-dev, else synthetic 455x333 photos
(the originals' median size).

Then the GPU estimate, an assumption, not a measurement: a GPU trains each backbone at the
published rate of EfficientNet-B0 (``PUBLISHED_B0``) divided by the backbone's FLOPs over B0's,
at the published multi-GPU efficiency. The last line is ``ratio: X.XX (goal >= 1.00)``: what
``--workers`` DataLoader workers prepare over what one GPU of a ``--gpus`` job is estimated to
train, for ``TrainConfig``'s default backbone: whether the recipe's workers keep a GPU fed.

    nice -n 10 .venv/bin/python bench/recipe.py [--size 288] [--workers 10] [--gpus 4] [--steps 8]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from bincounter.config import PreprocessConfig, TrainConfig
from bincounter.model.networks import ModelSpec, build_model, normalization_for
from bincounter.data.preprocess import _encode
from bincounter.model.transforms import TrainTransform, decode_bytes

SHARED = Path(__file__).resolve().parents[2] / "shared" / "abid-dev" / "bin-images"
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/efficientnet/README.md, "Training
# performance: NVIDIA A100 (8x A100 80GB)", 21.03 container: EfficientNet-B0 at 224 px, mixed
# precision, 2,489 images/s on one A100 and 16,652 on eight.
PUBLISHED_B0 = {"gpu": "A100 80GB", "one": 2489.0, "eight": 16652.0}
TRAIN_PHOTOS = 481_711  # 90% of the bucket's 535,234 photos (the recipe's 5% validation, 5% test)


def originals(limit: int) -> tuple[list[bytes], str]:
    """JPEG bytes of up to ``limit`` original photos, and where they came from."""
    found = []
    if SHARED.is_dir():
        for path in sorted(SHARED.glob("*.jpg")):
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                if img.size != (224, 224):
                    found.append(data)
            if len(found) >= limit:
                break
    if found:
        return found, f"{len(found)} originals of {SHARED.parent}"
    gen = torch.Generator().manual_seed(0)
    for _ in range(limit):
        # Smooth noise: compresses more like a photo than pixel noise does.
        pixels = torch.randint(0, 256, (42, 57, 3), dtype=torch.uint8, generator=gen).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).resize((455, 333), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        found.append(buf.getvalue())
    return found, f"{limit} synthetic 455x333 smooth-noise photos (no {SHARED})"


def preprocess_rate(photos: list[bytes], size: int, quality: int) -> tuple[float, list[bytes]]:
    """Photos/s of decode + resize + encode on one core, and the stored JPEGs."""
    stored = []
    t0 = time.process_time()
    for data in photos:
        with Image.open(io.BytesIO(data)) as img:
            stored.append(_encode(img, data, size, quality))
    return len(photos) / (time.process_time() - t0), stored


def input_rate(stored: list[bytes], size: int, batch: int, backbone: str) -> float:
    """Images/s of one DataLoader worker: decode the stored JPEGs, augment them a batch at a time."""
    mean, std = normalization_for(backbone)
    transform = TrainTransform(size=size, mean=mean, std=std)
    transform(torch.stack([decode_bytes(b) for b in stored[:batch]]))  # warm-up
    n = len(stored) // batch * batch
    t0 = time.process_time()
    for i in range(0, n, batch):
        transform(torch.stack([decode_bytes(b) for b in stored[i:i + batch]]))
    return n / (time.process_time() - t0)


def model_for(backbone: str, size: int, freeze_early: int) -> torch.nn.Module:
    spec = ModelSpec(backbone=backbone, num_classes=6, image_size=size)
    return build_model(spec, pretrained="none", freeze_early=freeze_early).to(memory_format=torch.channels_last)


def train_flops(backbone: str, size: int, freeze_early: int) -> float:
    """FLOPs of one training image: the forward pass counted by ``FlopCounterMode``, plus a
    backward of twice the forward (input and weight gradients) for the layers that train.

    (The backward is not counted directly: torch's counter overstates grouped convolutions'
    backward, 40x for EfficientNet-B0's depthwise ones.)"""
    model = model_for(backbone, size, freeze_early).eval()
    x = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    counts = counter.get_flop_counts()
    names = {id(m): name for name, m in model.named_modules()}
    frozen = sum(sum(counts.get(f"Counter.{names[id(m)]}", {}).values()) for m in model._frozen)
    total = counter.get_total_flops()
    return total + 2 * (total - frozen)


def step_rate(backbone: str, size: int, freeze_early: int, batch: int, steps: int) -> float:
    """Images per CPU-second of training steps on one thread (median step)."""
    model = model_for(backbone, size, freeze_early).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (batch,))
    times = []
    for i in range(steps + 1):  # the first step warms up (allocations, kernel choice)
        t0 = time.process_time()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:
            times.append(time.process_time() - t0)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=288, help="the recipe's image size")
    ap.add_argument("--photos", type=int, default=256, help="originals for the preprocess and input figures")
    ap.add_argument("--batch", type=int, default=8, help="batch of the CPU training steps")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per backbone and size")
    ap.add_argument("--workers", type=int, default=10, help="the recipe's DataLoader workers per GPU")
    ap.add_argument("--gpus", type=int, default=4, help="the recipe's GPUs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    freeze = TrainConfig().freeze_early

    photos, source = originals(args.photos)
    pre, stored = preprocess_rate(photos, args.size, PreprocessConfig().jpeg_quality)
    kb = statistics.mean(len(b) for b in stored) / 1000
    feed = input_rate(stored, args.size, 32, BACKBONES[0])
    print(f"photos: {source}; one thread; freeze_early {freeze} (TrainConfig's default)")
    print(f"preprocess {args.size} px: {pre:7.1f} originals/s per core; stored JPEG {kb:.1f} KB on average")
    print(f"input {args.size} px:      {feed:7.1f} images/s per DataLoader worker "
          "(decode + TrainTransform, batches of 32)")

    b0 = train_flops("efficientnet_b0", 224, 0)
    print(f"efficientnet_b0 224 px, nothing frozen: {b0 / 1e9:5.2f} GFLOP per training image "
          "(published GPU figures' model)")
    # The published 8-GPU efficiency; fewer GPUs on one node are assumed to scale at least as well.
    efficiency = PUBLISHED_B0["eight"] / (8 * PUBLISHED_B0["one"])
    per_gpu = {}
    for backbone in BACKBONES:
        for size in (224, args.size):
            flops = train_flops(backbone, size, freeze)
            rate = step_rate(backbone, size, freeze, args.batch, args.steps)
            print(f"{backbone} {size} px: {flops / 1e9:5.2f} GFLOP per training image ({flops / b0:4.2f}x B0 at 224), "
                  f"{rate:5.2f} images/s per core (batch {args.batch}, median of {args.steps} steps)")
        per_gpu[backbone] = PUBLISHED_B0["one"] * b0 / flops * efficiency  # at --size, the last one measured
    print(f"estimate, not measured: {args.gpus} x {PUBLISHED_B0['gpu']} at {efficiency:.3f} efficiency, "
          f"{TRAIN_PHOTOS:,} training photos, {args.size} px:")
    for backbone, rate in per_gpu.items():
        print(f"  {backbone}: {rate:6.0f} images/s per GPU, {args.gpus * rate:6.0f} in all, "
              f"{TRAIN_PHOTOS / (args.gpus * rate):4.0f} s per epoch; "
              f"DataLoader workers to keep up: {rate / feed:4.1f} per GPU")
    default = TrainConfig().backbone if TrainConfig().backbone in per_gpu else BACKBONES[0]
    print(f"ratio: {args.workers * feed / per_gpu[default]:.2f} (goal >= 1.00)")


if __name__ == "__main__":
    main()
