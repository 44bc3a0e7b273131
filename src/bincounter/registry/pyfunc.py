"""The MLflow pyfunc that serves everywhere: raw image bytes in, counts out.

It carries the trained weights and ``model_spec.json`` as artifacts and this package as code,
and does its own decoding and preprocessing through ``bincounter.model.predictor.Predictor``.
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd


class BinCounterModel(mlflow.pyfunc.PythonModel):
    """``predict(DataFrame({"image": [bytes, ...]}))`` -> one row per image."""

    def load_context(self, context) -> None:
        from bincounter.model.predictor import Predictor

        self.predictor = Predictor.from_dir(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        images = _images_of(model_input)
        return pd.DataFrame(self.predictor.predict_bytes(images))


def _images_of(model_input) -> list[bytes]:
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError("input needs a column 'image' holding raw JPEG/PNG bytes")
        column = model_input["image"]
    elif isinstance(model_input, (list, tuple)):
        column = model_input
    elif isinstance(model_input, (bytes, bytearray)):
        column = [model_input]
    else:
        raise ValueError(f"unsupported input type {type(model_input).__name__}")
    images = []
    for i, value in enumerate(column):
        if isinstance(value, str):  # MLflow's JSON input carries bytes as base64 text
            import base64

            value = base64.b64decode(value)
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"image {i}: expected bytes, got {type(value).__name__}")
        images.append(bytes(value))
    return images
