"""Train and eval transforms. Serving uses ``EvalTransform`` too, so the two can never disagree.

Both take a uint8 CHW tensor (as ``decode_image`` gives) and return a normalised float tensor.
"""

from __future__ import annotations

import io

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2 as T


def decode_bytes(data: bytes) -> torch.Tensor:
    """JPEG/PNG bytes to a uint8 RGB CHW tensor; raises ValueError on anything else."""
    if not data:
        raise ValueError("empty image")
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        pass
    # torchvision decodes JPEG/PNG/WebP/GIF; PIL covers the rest (BMP, TIFF...).
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return T.functional.pil_to_tensor(img.convert("RGB"))
    except Exception as exc:
        raise ValueError(f"could not decode the image: {exc}") from exc


class TrainTransform:
    """Augmentations that keep the count: bins are photographed from above, so both flips and
    small rotations are label-preserving; crops stay large so no item is cut away."""

    def __init__(self, *, size: int, mean: tuple, std: tuple, min_scale: float = 0.8,
                 rotation: float = 10.0, jitter: float = 0.25):
        self.pipeline = T.Compose([
            T.RandomResizedCrop(size, scale=(min_scale, 1.0), ratio=(0.85, 1.18), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.RandomApply([T.RandomRotation(rotation)], p=0.5),
            T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=0.02),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ])

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.pipeline(img)


class EvalTransform:
    """Resize the whole photo to a square (as preprocessing does) and normalise."""

    def __init__(self, *, size: int, mean: tuple, std: tuple):
        self.pipeline = T.Compose([
            T.Resize((size, size), antialias=True),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ])

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.pipeline(img)
