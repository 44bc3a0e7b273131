"""``bincounter synth``, ``bincounter s3-server`` and ``bincounter demo``: the demo's commands,
registered with the ``bincounter`` command line through the entry point group
``bincounter.commands`` (demo/pyproject.toml)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import tyro

from bincounter_demo.synth import SynthConfig

Flat = tyro.conf.arg(name="")  # the config's fields appear as top-level options


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def synth(out: Path, cfg: Annotated[SynthConfig, Flat] = SynthConfig()) -> None:
    """Generate synthetic bin photos in the bucket's layout (offline demo data)."""
    from bincounter_demo.synth import generate

    ids = generate(cfg, out, progress=True)
    _print({"out": str(out), "images": len(ids)})


def s3_server(folder: Path, bucket: str = "aft-vbi-pds", port: int = 0) -> None:
    """Serve a folder in the bucket's layout from a local S3 endpoint until Ctrl-C."""
    import time

    from bincounter_demo.s3server import LocalS3

    with LocalS3(port=port) as s3:
        n = s3.upload_folder(folder, bucket)
        print(f"s3://{bucket} ({n} objects) at {s3.endpoint}; Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def demo(n_images: int = 600, epochs: int = 4, keep_server: bool = False) -> None:
    """The whole pipeline end to end, offline: synthetic photos, a local S3 endpoint, training,
    registration, a local model server, and a few predictions next to the truth."""
    from bincounter_demo.demo import run

    run(n_images=n_images, epochs=epochs, keep_server=keep_server)


COMMANDS = {"synth": synth, "s3-server": s3_server, "demo": demo}
