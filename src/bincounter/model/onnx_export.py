"""Export a trained model, test-time views included, to ONNX for the model server.

The server runs ONNX Runtime because it measured fastest on CPU (``bench/serve.py`` prints
the raw figures); the graph is ``TTAProbabilities`` itself, so it returns the same averaged
probabilities as eager evaluation. Registration writes it next to ``model.pt``
(:func:`serving_files`), and evaluation scores the very same files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from bincounter.model.spec import ONNX_FILE

_OPSET = 17
_TOLERANCE = 1e-4
# torch.onnx.export keeps its state in module globals (and warnings filters are process-wide):
# registrations running in threads must take turns.
_EXPORT_LOCK = threading.Lock()


def export_onnx(model_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``model.onnx`` (input ``image``: normalised float NCHW, any batch size; output
    ``probabilities``) for the model in ``model_dir``; checks it against eager PyTorch.

    Returns the file's path. Raises RuntimeError if ONNX Runtime disagrees with PyTorch.
    """
    import numpy as np
    import onnxruntime as ort
    import torch

    from bincounter.model.networks import load_trained
    from bincounter.model.predictor import TTAProbabilities

    model, spec = load_trained(model_dir)
    module = TTAProbabilities(model, spec).eval()
    out = Path(out) if out is not None else Path(model_dir) / ONNX_FILE
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    example = torch.randn(2, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    try:
        with _EXPORT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(module, (example,), str(tmp), dynamo=False, opset_version=_OPSET,
                              input_names=["image"], output_names=["probabilities"],
                              dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}})
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        probe = torch.randn(3, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = module(probe).numpy()
        worst = float(np.abs(session.run(None, {"image": probe.numpy()})[0] - expected).max())
        if not worst <= _TOLERANCE:
            raise RuntimeError(f"ONNX export of {model_dir} disagrees with PyTorch by {worst:.2e}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


SERVING_FILES = ("model.pt", "model_spec.json")


@contextlib.contextmanager
def serving_files(model_dir: str | Path, extra: Sequence[str | Path] = ()) -> Iterator[Path]:
    """A temporary folder holding just what a registered model serves: ``model.pt``,
    ``model_spec.json``, the ``model.onnx`` exported from them, and the ``extra`` files (the
    verdict thresholds evaluation chose, ``model.calibration.VERDICT_FILE``). Registration logs
    this folder and evaluation scores it, so both see the same export; it is removed on exit (a
    leaked copy of the weights per call would fill the disk of a long-lived worker)."""
    with tempfile.TemporaryDirectory(prefix="bincounter-serving-") as tmp:
        out = Path(tmp) / "model"
        out.mkdir()
        for name in SERVING_FILES:
            shutil.copy2(Path(model_dir) / name, out / name)
        for path in map(Path, extra):
            shutil.copy2(path, out / path.name)
        export_onnx(out)
        yield out
