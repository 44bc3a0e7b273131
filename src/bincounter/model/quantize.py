"""INT8 for the served graph: ONNX Runtime's static quantization (QDQ, weights per channel),
calibrated on photos the model did not train on. About twice the fp32 photos/s per CPU core
(``bench/int8.py``); evaluation scores it beside fp32 and keeps it only when it answers as well
(``EvaluateConfig.int8_max_accuracy_drop``). Needs ``onnx`` and ``onnxruntime``, not torch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from bincounter.fileio import atomic_write


def quantize_int8(fp32: str | Path, batches: Iterable[np.ndarray], out: str | Path) -> Path:
    """Write the INT8 version of the ``fp32`` graph to ``out``, its activation ranges taken from
    ``batches`` (normalised float32 NCHW, as the graph takes them). Deterministic: the same
    graph and photos give the same file."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds = [{"image": np.ascontiguousarray(b, dtype=np.float32)} for b in batches]
    if not feeds:
        raise ValueError("INT8 calibration needs at least one batch of photos")

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.left, None)

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="bincounter-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))  # shape inference and graph fusions first
        staged = Path(tmp) / out.name
        quantize_static(str(prepared), str(staged), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        atomic_write(out, staged.read_bytes())
    return out
