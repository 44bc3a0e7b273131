"""From raw image bytes to counts: the one code path that evaluation and serving share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bincounter.models import ModelSpec
from bincounter.transforms import EvalTransform, decode_bytes, tta_views


class Predictor:
    """A trained model with its preprocessing. ``probabilities`` is the single place where
    test-time augmentation happens, so a served model behaves exactly as it was evaluated."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.spec = spec
        self.transform = EvalTransform(size=spec.image_size, mean=spec.mean, std=spec.std)
        self.values = np.arange(spec.min_count, spec.min_count + spec.num_classes, dtype=np.float64)

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> "Predictor":
        from bincounter.train import load_trained

        model, spec = load_trained(model_dir, device)
        return cls(model, spec, device)

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """Class probabilities for a normalised NCHW batch."""
        x = batch.to(self.device)
        views = tta_views(x, self.spec.rot90) if self.spec.tta else [x]
        p = sum(F.softmax(self.model(v).float(), dim=1) for v in views) / len(views)
        return p.cpu().numpy()

    def prepare(self, images: Sequence[bytes]) -> torch.Tensor:
        """Decode and transform raw bytes; ValueError names the first bad image."""
        tensors = []
        for i, data in enumerate(images):
            try:
                tensors.append(self.transform(decode_bytes(bytes(data))))
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
        k = int(p.argmax())
        return {
            "count": int(self.values[k]),
            "label": self.spec.class_names[k] if self.spec.class_names else str(int(self.values[k])),
            "confidence": float(p[k]),
            "expected_count": float(p @ self.values),
            "probabilities": [float(v) for v in p],
        }
