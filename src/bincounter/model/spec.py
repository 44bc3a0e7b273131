"""What a trained counter is, without the network: its spec (stored next to its weights) and how
its class probabilities read as an answer. Numpy only: the serving image, which has no torch,
reads models through this module."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

ONNX_FILE = "model.onnx"  # the graph the server runs (model.onnx_export writes it)
INT8_ONNX_FILE = "model.int8.onnx"  # its INT8 version, when evaluation kept it (model.quantize)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1].
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild a trained model: stored next to its weights."""

    backbone: str
    num_classes: int
    head: str = "linear"
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    min_count: int = 0
    class_names: tuple[str, ...] = ()
    tta: bool = False  # average over the four flips; evaluation and serving both honour it
    rot90: bool = False  # trained with 90-degree rotations: test-time augmentation adds the transposes
    # Fitted on held-out validation photos after training (bincounter.training.calibrate):
    temperature: float = 1.0  # logits are divided by it before the softmax: calibrated probabilities
    count_set_threshold: float | None = None  # a count is in an answer's count set at this probability
    count_set_coverage: float | None = None  # ... which held the true count this often

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        d["class_names"] = tuple(d.get("class_names", ()))
        return cls(**d)



def describe(p: np.ndarray, spec: ModelSpec) -> dict:
    """One image's answer from its class probabilities."""
    values = np.arange(spec.min_count, spec.min_count + spec.num_classes, dtype=np.float64)
    k = int(p.argmax())
    return {
        "count": int(values[k]),
        "label": spec.class_names[k] if spec.class_names else str(int(values[k])),
        "confidence": float(p[k]),
        "expected_count": float(p @ values),
        "probabilities": [float(v) for v in p],
    }
