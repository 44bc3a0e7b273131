"""A deterministic counting model for tests: certain, and right on the photos it was shown.

It is a real MLflow pyfunc taking raw image bytes, like the registered model: it looks each
photo up by its sha256 in a table of true counts and answers a one-hot probability over
counts 0-5. Bytes it cannot decode raise ValueError, as the real model does. Two test hooks,
by environment variable: ``FAKE_COUNTER_CALLS`` (a file that gets one line per call with the
number of photos) and ``FAKE_COUNTER_KILL_AFTER`` (SIGKILL this process at the start of the
call after that many calls, to test resuming).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

NUM_CLASSES = 6


def truth_table(folder: Path) -> dict[str, int]:
    """sha256 of each photo of a bucket-layout folder -> its true count (from its metadata)."""
    table = {}
    for meta in sorted((folder / "metadata").glob("*.json")):
        image = folder / "bin-images" / f"{meta.stem}.jpg"
        table[hashlib.sha256(image.read_bytes()).hexdigest()] = json.loads(meta.read_text())["EXPECTED_QUANTITY"]
    return table


class FakeCounter(mlflow.pyfunc.PythonModel):
    def __init__(self, table: dict[str, int] | None = None):
        self.table = table
        self.calls = 0

    def load_context(self, context) -> None:
        self.table = json.loads(Path(context.artifacts["truth"]).read_text())

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        self.calls += 1
        kill_after = os.environ.get("FAKE_COUNTER_KILL_AFTER")
        if kill_after and self.calls > int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)
        images = list(model_input["image"])
        rows = [self._one(bytes(image)) for image in images]
        log = os.environ.get("FAKE_COUNTER_CALLS")
        if log:
            with open(log, "a") as f:
                f.write(f"{len(images)}\n")
        return pd.DataFrame(rows)

    def _one(self, image: bytes) -> dict:
        from PIL import Image

        try:
            Image.open(io.BytesIO(image)).verify()
        except Exception as exc:
            raise ValueError(f"could not decode the image: {exc}") from exc
        count = self.table.get(hashlib.sha256(image).hexdigest())
        if count is None:
            raise ValueError("the fake counter was not shown this photo")
        probs = [0.0] * NUM_CLASSES
        probs[min(count, NUM_CLASSES - 1)] = 1.0
        return {"count": count, "label": str(count), "confidence": 1.0, "expected_count": float(count),
                "probabilities": probs}


def register_fake(folder: Path, work: Path, *, reliability: dict | None = None, verdicts: dict | None = None,
                  name: str = "bincounter") -> str:
    """Log and register the fake counter for ``folder`` as ``name@champion``; with
    ``reliability``, also log an evaluation metrics.json beside it, with ``verdicts`` a
    verdict.json (the thresholds evaluation chose). Returns the version."""
    import mlflow
    from mlflow import MlflowClient

    truth = work / "truth.json"
    truth.write_text(json.dumps(truth_table(folder)))
    mlflow.set_experiment("fake-counter")  # not an earlier test's experiment id (mlflow keeps it process-wide)
    with mlflow.start_run(run_name="fake-counter"):
        info = mlflow.pyfunc.log_model(name="model", python_model=FakeCounter(), artifacts={"truth": str(truth)},
                                       pip_requirements=["pandas"])
        if reliability is not None:
            mlflow.log_dict({"n": 100, "reliability": reliability}, "evaluation/metrics.json")
        if verdicts is not None:
            mlflow.log_dict(verdicts, "evaluation/verdict.json")
    version = mlflow.register_model(info.model_uri, name).version
    MlflowClient().set_registered_model_alias(name, "champion", version)
    return str(version)
