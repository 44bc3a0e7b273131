"""Preprocess speed: images/s of ``bincounter.data.preprocess`` vs a naive per-image PIL loop.

Input: all 7,106 real photos of ../shared/abid-dev (about 11% originals, the rest 224 px
copies), copied with a local-folder ingest; without that folder, 1,500 synthetic 224 px
photos (the output says which). All of them, not a sample: images/s is a throughput, and
preprocess has fixed costs (a process pool, the report's plots: about a second) that a
small run would mostly measure.

The naive loop is what a first notebook does: for each photo, ``Image.open``, convert to
RGB, resize to 224x224, save as JPEG. Ours is the whole ``preprocess()`` call: metadata
checks, decoding every photo, duplicate detection, splits, resizing, shards, index, report.
It keeps every count (``overflow="class"``), so it handles every photo the loop does.
Imports happen before timing. Each side runs twice, alternating; the faster run counts.

Run: ``.venv/bin/python bench/preprocess.py``; the last line is ``ratio: X.XX (goal >= 2.5)``.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

from PIL import Image

import bincounter.data.report  # noqa: F401  # imported before timing, like PIL for the loop
from bincounter.config import IngestConfig, PreprocessConfig, SourceConfig
from bincounter.data.ingest import ingest
from bincounter.data.preprocess import preprocess
from bincounter_demo.synth import SynthConfig, generate

N_SYNTHETIC = 1500
SIZE = 224
QUALITY = 92
SHARED = Path(__file__).resolve().parents[2] / "shared" / "abid-dev"


def prepare(folder: Path) -> str:
    """An ingest folder with the photos to process; returns a description of them."""
    if (SHARED / "metadata").is_dir():
        ingest(IngestConfig(source=SourceConfig(uri=str(SHARED)), progress=False), folder)
        sizes = [Image.open(p).size for p in (folder / "bin-images").glob("*.jpg")]
        small = sum(s == (SIZE, SIZE) for s in sizes)
        return f"{len(sizes)} real photos from {SHARED} ({small} already {SIZE}x{SIZE}, {len(sizes) - small} originals)"
    generate(SynthConfig(n_images=N_SYNTHETIC, image_size=SIZE, seed=0), folder)
    return f"{N_SYNTHETIC} synthetic {SIZE} px photos ({SHARED} not found)"


def naive(in_dir: Path, out_dir: Path) -> int:
    """Open, resize, save: one photo at a time."""
    out_dir.mkdir(parents=True)
    names = sorted(os.listdir(in_dir / "bin-images"))
    for name in names:
        img = Image.open(in_dir / "bin-images" / name).convert("RGB").resize((SIZE, SIZE))
        img.save(out_dir / name, format="JPEG", quality=QUALITY)
    return len(names)


def ours(in_dir: Path, out_dir: Path) -> int:
    cfg = PreprocessConfig(image_size=SIZE, jpeg_quality=QUALITY, overflow="class")
    result = preprocess(cfg, in_dir, out_dir, progress=False)
    return sum(result.sizes.values()) + sum(result.quarantined.values())


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (preprocess's worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, *args) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one run."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    n = fn(*args)
    return n, time.perf_counter() - start, _cpu_seconds() - cpu


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        what = prepare(tmp / "in")
        runs: dict[str, list[tuple[int, float, float]]] = {"naive": [], "ours": []}
        for i in range(2):
            runs["naive"].append(timed(naive, tmp / "in", tmp / f"naive{i}"))
            runs["ours"].append(timed(ours, tmp / "in", tmp / f"ours{i}"))

    best = {k: min(v, key=lambda r: r[1]) for k, v in runs.items()}
    assert best["naive"][0] == best["ours"][0], best
    print(f"input: {what}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for key, name in (("naive", "naive PIL loop"), ("ours", "bincounter preprocess")):
        n, t, cpu = best[key]
        all_runs = ", ".join(f"{r[1]:.2f} s" for r in runs[key])
        print(f"{name:22s} {n / t:8.1f} images/s ({t:.2f} s, {cpu:.2f} CPU s; runs: {all_runs})")
    print(f"ratio: {best['naive'][1] / best['ours'][1]:.2f} (goal >= 2.5)")


if __name__ == "__main__":
    main()
