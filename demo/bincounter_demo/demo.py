"""``make demo``: the whole pipeline end to end on this machine, offline.

Synthetic photos in the bucket's layout -> a local S3 endpoint (moto) -> the kfp pipeline on the
local runner through the real S3 ingest path -> MLflow on SQLite -> a local model server ->
a few photos counted next to their truth. Every process it starts is stopped, also on failure.
"""

from __future__ import annotations

import json
import shutil
import time

from bincounter.config import DeployConfig, IngestConfig, PipelineConfig, PreprocessConfig, SourceConfig, TrainConfig
from bincounter_demo.synth import SynthConfig
from bincounter.paths import default_tracking_uri, home

BUCKET = "aft-vbi-pds"  # the real bucket's name, served locally


def demo_config(endpoint: str, epochs: int) -> PipelineConfig:
    """Small enough for a 2-core laptop in a few minutes; everything else as in production."""
    return PipelineConfig(
        ingest=IngestConfig(source=SourceConfig(uri=f"s3://{BUCKET}", endpoint_url=endpoint), workers=16),
        preprocess=PreprocessConfig(image_size=128),
        train=TrainConfig(image_size=128, epochs=epochs, batch_size=32, lr=2e-3, workers=0,
                          early_stopping_patience=0),
        deploy=DeployConfig(target="local", port=0),
    )


def run(n_images: int = 600, epochs: int = 4, keep_server: bool = False, show: int = 8) -> list[dict]:
    from bincounter.serving.client import count_images
    from bincounter.deploy import stop
    from bincounter.data.split import split_of
    from bincounter_demo.s3server import LocalS3
    from bincounter_demo.synth import generate
    from pipelines.runner import run_local

    started = time.perf_counter()
    work = home() / "demo"
    synth_dir = work / "synthetic"
    shutil.rmtree(work / "kfp", ignore_errors=True)
    print(f"[1/4] generating {n_images} synthetic bin photos in {synth_dir}", flush=True)
    ids = generate(SynthConfig(n_images=n_images, image_size=160), synth_dir, progress=True)

    tracking_uri = default_tracking_uri()
    rows: list[dict] = []
    with LocalS3() as s3:
        n = s3.upload_folder(synth_dir, BUCKET)
        print(f"[2/4] local S3 endpoint {s3.endpoint} serves s3://{BUCKET} ({n} objects)", flush=True)
        cfg = demo_config(s3.endpoint, epochs)
        print("[3/4] running the pipeline on kfp's local runner: ingest -> preprocess -> train -> "
              "evaluate -> register -> deploy", flush=True)
        try:
            run_local(cfg, tracking_uri, work / "kfp")
            state = json.loads((home() / "deployments" / "bincounter.json").read_text())
            test_ids = [i for i in ids if split_of(i, cfg.preprocess) == "test"][:show]
            truth = {i: json.loads((synth_dir / "metadata" / f"{i}.json").read_text())["EXPECTED_QUANTITY"]
                     for i in test_ids}
            paths = [synth_dir / "bin-images" / f"{i}.jpg" for i in test_ids]
            results = count_images(state["url"], paths)
            print(f"[4/4] model server {state['url']} counted {len(paths)} held-out photos:", flush=True)
            print(f"{'photo':>8} {'truth':>6} {'predicted':>10} {'confidence':>11}")
            for i, r in zip(test_ids, results):
                rows.append({"id": i, "truth": truth[i], "count": r["count"], "confidence": r["confidence"]})
                mark = "ok" if r["count"] == truth[i] else ""
                print(f"{i:>8} {truth[i]:>6} {r['count']:>10} {r['confidence']:>11.2f}  {mark}")
        finally:
            if not keep_server:
                stop("local", "bincounter")
    correct = sum(r["truth"] == r["count"] for r in rows)
    print(f"\n{correct}/{len(rows)} exact on this sample; full test metrics are in MLflow.")
    print(f"Demo took {time.perf_counter() - started:.0f} s. MLflow store: {tracking_uri}")
    print("Open the MLflow UI with:  make ui   (then http://127.0.0.1:5000)")
    return rows
