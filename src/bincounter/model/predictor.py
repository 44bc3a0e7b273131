"""From raw image bytes to counts: the one code path that evaluation and serving share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bincounter.model.networks import load_trained
from bincounter.model.spec import ModelSpec, describe
from bincounter.model.transforms import DEFAULT_MAX_PIXELS, EvalTransform, decode_untrusted, tta_views


class TTAProbabilities(nn.Module):
    """Class probabilities averaged over the test-time views: the single place where
    test-time augmentation happens (eager evaluation, the pyfunc and the ONNX export all run
    this module), so a served model behaves exactly as it was evaluated."""

    def __init__(self, model: nn.Module, spec: ModelSpec, temperature: float | None = None):
        super().__init__()
        self.model = model
        self.tta = spec.tta
        self.rot90 = spec.rot90
        # The calibrated temperature (model.calibration): every path that answers probabilities runs this module.
        self.temperature = float(spec.temperature if temperature is None else temperature)

    def view_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[photos, views, classes]: each test-time view's logits, before the temperature."""
        views = tta_views(x, self.rot90) if self.tta else [x]
        # One model call over all views: batch norm is in eval mode, so images stay independent.
        return self.model(torch.cat(views)).float().view(len(views), x.shape[0], -1).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.view_logits(x) / self.temperature, dim=2).mean(1)


class Predictor:
    """A trained model with its preprocessing."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, device: str | torch.device = "cpu",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.spec = spec
        self.max_pixels = max_pixels
        self.transform = EvalTransform(size=spec.image_size, mean=spec.mean, std=spec.std)
        self.values = np.arange(spec.min_count, spec.min_count + spec.num_classes, dtype=np.float64)

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> "Predictor":
        model, spec = load_trained(model_dir, device)
        return cls(model, spec, device)

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor, temperature: float | None = None) -> np.ndarray:
        """Class probabilities for a normalised NCHW batch (at the spec's temperature, or ``temperature``)."""
        # Built per call from the current spec (cheap), so a changed ``spec.tta`` takes effect.
        return TTAProbabilities(self.model, self.spec, temperature)(batch.to(self.device)).cpu().numpy()

    @torch.no_grad()
    def view_logits(self, batch: torch.Tensor) -> np.ndarray:
        """[photos, views, classes] logits of the test-time views (to fit a temperature on)."""
        return TTAProbabilities(self.model, self.spec).view_logits(batch.to(self.device)).cpu().numpy()

    def prepare_one(self, data: bytes) -> torch.Tensor:
        """Decode (refusing doubtful input, see ``decode_untrusted``) and transform one image."""
        return self.transform(decode_untrusted(bytes(data), max_pixels=self.max_pixels))

    def prepare(self, images: Sequence[bytes]) -> torch.Tensor:
        """Decode and transform raw bytes; ValueError names the first bad image."""
        tensors = []
        for i, data in enumerate(images):
            try:
                tensors.append(self.prepare_one(data))
            except ValueError as exc:
                raise ValueError(f"image {i}: {exc}") from exc
        return torch.stack(tensors)

    def predict_bytes(self, images: Sequence[bytes], batch_size: int = 32) -> list[dict]:
        """One result per image: count, confidence, expected count, probabilities."""
        out: list[dict] = []
        for start in range(0, len(images), batch_size):
            probs = self.probabilities(self.prepare(images[start:start + batch_size]))
            out += [self.describe(p) for p in probs]
        return out

    def describe(self, p: np.ndarray) -> dict:
        return describe(p, self.spec)

