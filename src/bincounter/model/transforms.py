"""Train and eval transforms. The server's torch-free ``images.EvalArrays`` is held to ``EvalTransform``
by a parity test, so the two never disagree by more than a grey level.

Both take a uint8 CHW tensor (as ``decode_image`` gives) and return a normalised float tensor;
both also take a uint8 NCHW batch (``batched = True``), which ``ShardDataset`` uses to transform
a whole batch at once.
"""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2 as T

from bincounter.model.images import (  # noqa: F401 - the untrusted-image checks, re-exported
    ACCEPTED_FORMATS, DEFAULT_MAX_PIXELS, ImageHeader, ImageRejected, ImageTooLarge, UnsupportedImage, decode_rgb,
    read_header)


def decode_untrusted(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """:func:`bincounter.model.images.decode_rgb` as a uint8 RGB CHW tensor (same checks, same errors)."""
    return torch.from_numpy(decode_rgb(data, max_pixels=max_pixels)).permute(2, 0, 1)


def decode_bytes(data: bytes) -> torch.Tensor:
    """JPEG/PNG bytes to a uint8 RGB CHW tensor; raises ValueError on anything else.

    For trusted data only (the shards preprocessing wrote); untrusted bytes go through
    :func:`decode_untrusted`."""
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
    small rotations are label-preserving; crops stay large so no item is cut away.

    Takes one uint8 CHW image or a uint8 NCHW batch. A batch is augmented in one go, with
    independent random parameters per image: crop, flips and rotation become one affine warp
    (a single ``grid_sample``), colour jitter and normalisation run as whole-batch tensor ops.
    Per-image torchvision pipelines spend most of their time in per-op overheads on small
    tensors, which costs a CPU-bound training loop a large share of its throughput.

    The distributions follow ``RandomResizedCrop(size, scale=(min_scale, 1), ratio=(0.85, 1.18))``,
    both ``RandomFlip``s, with ``rot90`` a transpose with probability 0.5 (with the flips: any of the
    square's eight symmetries, so any multiple of 90 degrees),
    ``RandomApply([RandomRotation(rotation)], p=0.5)`` (corners outside the crop filled with
    black) and ``ColorJitter(jitter, jitter, jitter, hue=0.02)``. Differences: the
    jitter order is drawn per batch rather than per image, the hue shift is a rotation in YIQ
    space (not HSV) and the warp is bilinear.
    """

    batched = True  # ShardDataset hands whole batches to transforms that say so

    def __init__(self, *, size: int, mean: tuple, std: tuple, min_scale: float = 0.8,
                 rotation: float = 10.0, jitter: float = 0.25, hue: float = 0.02, rot90: bool = False):
        self.size, self.min_scale, self.rotation, self.jitter, self.hue = size, min_scale, rotation, jitter, hue
        self.rot90 = rot90
        self.log_ratio = (math.log(0.85), math.log(1.18))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim == 3:
            return self(img.unsqueeze(0))[0]
        x = img.float().div_(255) if img.dtype == torch.uint8 else img.float()
        x = self._warp(self._shrink(x))
        x = self._color(x)
        return x.sub_(self.mean).div_(self.std)

    def _shrink(self, x: torch.Tensor) -> torch.Tensor:
        """Antialiased downscale first when crops would shrink by over 1.25x (bilinear sampling
        alone would alias); the smallest crop then maps about 1:1."""
        factor = min(x.shape[-2:]) * math.sqrt(self.min_scale) / self.size
        if factor <= 1.25:
            return x
        hw = (round(x.shape[-2] / factor), round(x.shape[-1] / factor))
        return F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)

    def _warp(self, x: torch.Tensor) -> torch.Tensor:
        """Crop, flips and rotation as one affine map per image (normalised coordinates)."""
        n, _, h, w = x.shape
        # RandomResizedCrop: area fraction and aspect ratio, clipped to the image.
        area = torch.empty(n).uniform_(self.min_scale, 1.0)
        ratio = torch.empty(n).uniform_(*self.log_ratio).exp_()
        cw = (area * ratio * (h / w)).sqrt().clamp(max=1.0)  # crop width / image width
        ch = (area / ratio * (w / h)).sqrt().clamp(max=1.0)  # crop height / image height
        cx = (torch.rand(n) * 2 - 1) * (1 - cw)  # crop centre, anywhere that keeps it inside
        cy = (torch.rand(n) * 2 - 1) * (1 - ch)
        flip_x = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        flip_y = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        angle = torch.empty(n).uniform_(-self.rotation, self.rotation).deg2rad_()
        angle = torch.where(torch.rand(n) < 0.5, angle, torch.zeros(n))
        cos, sin = angle.cos(), angle.sin()
        # Output pixel centres -> crop coordinates (undo the rotation, then the flips), by
        # broadcasting: cheaper than affine_grid's batched matmul.
        t = (torch.arange(self.size, dtype=torch.float32) * 2 + 1) / self.size - 1
        u, v = t.view(1, 1, -1), t.view(1, -1, 1)
        if self.rot90:  # transpose: swap which output axis reads the crop's x
            swap = (torch.rand(n) < 0.5).view(n, 1, 1)
            u, v = torch.where(swap, v, u), torch.where(swap, u, v)
        col = lambda z: z.view(n, 1, 1)  # noqa: E731
        qx = col(cos * flip_x) * u - col(sin * flip_x) * v
        qy = col(sin * flip_y) * u + col(cos * flip_y) * v
        # Crop -> image coordinates.
        grid = torch.stack([qx * col(cw) + col(cx), qy * col(ch) + col(cy)], dim=-1)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if bool((angle != 0).any()):  # rotated corners fall outside the crop: black, as RandomRotation fills
            out.masked_fill_(((qx.abs() > 1) | (qy.abs() > 1)).unsqueeze(1), 0.0)
        return out

    def _color(self, x: torch.Tensor) -> torch.Tensor:
        """ColorJitter with a factor per image; brightness, contrast, saturation, hue in random order."""
        n = x.shape[0]
        j = self.jitter
        for op in torch.randperm(4).tolist():
            if op == 0 and j:
                x = x.mul_(torch.empty(n, 1, 1, 1).uniform_(max(0.0, 1 - j), 1 + j)).clamp_(0, 1)
            elif op == 1 and j:
                mean = _gray(x).mean(dim=(-2, -1), keepdim=True)
                x = _blend(x, mean, torch.empty(n, 1, 1, 1).uniform_(max(0.0, 1 - j), 1 + j))
            elif op == 2 and j:
                x = _blend(x, _gray(x), torch.empty(n, 1, 1, 1).uniform_(max(0.0, 1 - j), 1 + j))
            elif op == 3 and self.hue:
                theta = torch.empty(n).uniform_(-self.hue, self.hue) * (2 * math.pi)
                m = _YIQ_INV @ _hue_rotation(theta) @ _YIQ  # (n, 3, 3)
                x = torch.bmm(m, x.flatten(2)).view_as(x).clamp_(0, 1)
        return x


_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = torch.linalg.inv(_YIQ)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1] (torchvision's _blend)."""
    return x.mul_(factor).add_(other * (1 - factor)).clamp_(0, 1)


def _hue_rotation(theta: torch.Tensor) -> torch.Tensor:
    """Rotations of the (I, Q) chroma plane: (n, 3, 3)."""
    cos, sin, zero, one = theta.cos(), theta.sin(), torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack([torch.stack([one, zero, zero], 1),
                        torch.stack([zero, cos, -sin], 1),
                        torch.stack([zero, sin, cos], 1)], 1)


def tta_views(x: torch.Tensor, rot90: bool = False) -> list[torch.Tensor]:
    """Test-time views of an NCHW batch: its four flips and, with ``rot90``, their transposes
    (all eight symmetries of the square). Each shows the same bin from above, so the same count."""
    views = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)]
    if rot90:
        views += [v.transpose(2, 3) for v in views]
    return views


class EvalTransform:
    """Resize the whole photo to a square (as preprocessing does) and normalise; one uint8 CHW
    image or a uint8 NCHW batch (same result per image either way)."""

    batched = True

    def __init__(self, *, size: int, mean: tuple, std: tuple):
        self.pipeline = T.Compose([
            T.Resize((size, size), antialias=True),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ])

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.pipeline(img)
