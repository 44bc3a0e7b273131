"""INT8 against fp32: photos/s of ``bincounter.serving`` on the same model, same photos, same run.

The model is ``bench/serve.py``'s (EfficientNet-Lite0, 224 px, 4-flip test-time views, ImageNet
weights, an untrained head: speed does not depend on the head's training), exported to ONNX and
quantized as evaluation quantizes it (``model.quantize``, calibrated on 64 of the photos). The
server runs with its defaults, once with ``--precision fp32`` and once with ``--precision int8``,
one at a time, at concurrency 1 and 8. Whether INT8 answers as well is evaluation's to say
(``metrics.json``'s ``int8``: accuracy, NLL and ECE of both on the test photos).

Run: ``.venv/bin/python bench/int8.py``; the last line is ``ratio: X.XX (goal >= 1.5)``
(INT8 photos/s over fp32's at concurrency 8).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).with_name("serve.py"))
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)


def model_folder(work: Path, photos: list[bytes]) -> Path:
    from bincounter.model.images import EvalArrays, decode_rgb
    from bincounter.model.networks import ModelSpec, build_model, normalization_for, save_model_folder
    from bincounter.model.onnx_export import export_onnx
    from bincounter.model.quantize import quantize_int8
    from bincounter.model.spec import INT8_ONNX_FILE

    mean, std = normalization_for("efficientnet_lite0")
    spec = ModelSpec(backbone="efficientnet_lite0", num_classes=6, image_size=224, mean=mean, std=std,
                     class_names=tuple("012345"), tta=True)
    folder = save_model_folder(build_model(spec, pretrained="auto").eval(), spec, work / "model")
    onnx = export_onnx(folder)
    transform = EvalArrays(size=224, mean=mean, std=std)
    arrays = [transform(decode_rgb(b)) for b in photos[:64]]
    quantize_int8(onnx, [np.stack(arrays[i:i + 16]) for i in range(0, len(arrays), 16)], folder / INT8_ONNX_FILE)
    sizes = {p.name: p.stat().st_size / 2**20 for p in (onnx, folder / INT8_ONNX_FILE)}
    print(f"model: EfficientNet-Lite0, 224 px, 4-flip TTA; {', '.join(f'{k} {v:.1f} MiB' for k, v in sizes.items())}",
          flush=True)
    return folder


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        work = Path(tmp)
        images, described = serve.photos(work)
        print(f"photos: {described}")
        print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (the machine may be shared)")
        folder = model_folder(work, images)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH")) if p)
        requests = [("/v1/count", b, {"Content-Type": "image/jpeg"}) for b in images]
        results: dict = {}
        for precision in ("fp32", "int8"):
            port = serve.free_port()
            server = serve.start([sys.executable, "-m", "bincounter.serving", "--model-uri", str(folder),
                                  "--precision", precision, "--port", str(port), "--no-access-log"],
                                 port, "/readyz", work / f"{precision}.log")
            try:
                serve.measure(precision, port, requests, results)
            finally:
                serve.stop(server)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        print(f"concurrency 1: int8 / fp32 = {results[('int8', 1)]['photos_per_s'] / results[('fp32', 1)]['photos_per_s']:.2f}")
        print(f"ratio: {results[('int8', 8)]['photos_per_s'] / results[('fp32', 8)]['photos_per_s']:.2f} (goal >= 1.5)")


if __name__ == "__main__":
    main()
