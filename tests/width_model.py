"""A stand-in for the registered model, with its contract, for the model server's tests.

It decodes each photo (bytes it cannot decode raise ValueError, as the real model's do) and
counts its width: count = min(width // px_per_item, 5), probability ``top`` on that count,
``runner_up`` on the next one (mod 6), the rest spread evenly; the output is numpy-typed, as
the pyfunc's. It records the size of every call and refuses to run on an event loop
(inference belongs in a worker). The ``width_model`` fixture in conftest.py gives one.

Standalone on purpose (numpy, pandas and Pillow only): tests/deploy/test_local.py writes this
source into an MLflow "model from code", which a server process loads without the tests.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pandas as pd
from PIL import Image

NUM_CLASSES = 6
COLUMNS = ["count", "confidence", "expected_count", "probabilities"]


class WidthModel:
    def __init__(self, px_per_item: int = 8, top: float = 0.9, runner_up: float = 0.0) -> None:
        self.px_per_item = px_per_item
        self.top = top
        self.runner_up = runner_up
        self.calls: list[int] = []

    def probabilities(self, count: int) -> np.ndarray:
        rest = (1.0 - self.top - self.runner_up) / (NUM_CLASSES - 1 - (self.runner_up > 0))
        probs = np.full(NUM_CLASSES, rest, dtype=np.float32)
        if self.runner_up:
            probs[(count + 1) % NUM_CLASSES] = self.runner_up
        probs[count] = self.top
        return probs

    def predict(self, df: pd.DataFrame) -> pd.DataFrame:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise AssertionError("predict ran on the event loop")
        assert list(df.columns) == ["image"]
        self.calls.append(len(df))
        rows = []
        for data in df["image"]:
            assert isinstance(data, bytes)
            try:
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
                    width = img.width
            except Exception as exc:
                raise ValueError(f"cannot decode image: {exc}") from exc
            count = min(width // self.px_per_item, NUM_CLASSES - 1)
            probs = self.probabilities(count)
            rows.append({"count": np.int64(count), "confidence": np.float32(self.top),
                         "expected_count": np.float64(probs @ np.arange(NUM_CLASSES)), "probabilities": probs})
        return pd.DataFrame(rows, columns=COLUMNS)
