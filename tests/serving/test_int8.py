"""The INT8 graph: quantized from the served fp32 graph on calibration photos, answering as fp32
does on most photos, chosen by the server's precision setting."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bincounter.config import ServeConfig
from bincounter.model.images import EvalArrays, decode_rgb
from bincounter.model.onnx_export import export_onnx
from bincounter.model.quantize import quantize_int8
from bincounter.model.spec import INT8_ONNX_FILE, ONNX_FILE, ModelSpec
from bincounter.serving.loading import engine_spec
from bincounter.serving.worker import NativeEngine


@pytest.fixture(scope="module")
def int8_model(model_dir, synth_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("int8") / "model"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("checkpoint.pt", "profile", "plots"))
    export_onnx(folder)
    spec = ModelSpec.from_dict(__import__("json").loads((folder / "model_spec.json").read_text()))
    transform = EvalArrays(size=spec.image_size, mean=spec.mean, std=spec.std)
    photos = sorted((synth_dir / "bin-images").glob("*.jpg"))[:64]
    arrays = [transform(decode_rgb(p.read_bytes())) for p in photos]
    quantize_int8(folder / ONNX_FILE, [np.stack(arrays[i:i + 16]) for i in range(0, 64, 16)], folder / INT8_ONNX_FILE)
    return folder


def test_the_int8_graph_answers_as_fp32_on_most_photos(int8_model, synth_dir):
    photos = [p.read_bytes() for p in sorted((synth_dir / "bin-images").glob("*.jpg"))[64:264]]
    answers = {}
    for precision in ("fp32", "int8"):
        spec = engine_spec(ServeConfig(precision=precision), int8_model, int8_model)
        assert spec.precision == precision
        engine = NativeEngine(spec)
        assert engine.info.backend == ("onnx-int8" if precision == "int8" else "onnx")
        answers[precision] = np.array([o[1]["probabilities"] for o in engine.run(photos)])
    same = (answers["fp32"].argmax(1) == answers["int8"].argmax(1)).mean()
    assert same >= 0.9, same
    assert np.abs(answers["fp32"] - answers["int8"]).max() < 0.25
    assert (int8_model / INT8_ONNX_FILE).stat().st_size < (int8_model / ONNX_FILE).stat().st_size


def test_quantization_is_deterministic(int8_model, tmp_path):
    arrays = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    a = quantize_int8(int8_model / ONNX_FILE, [arrays], tmp_path / "a.onnx")
    b = quantize_int8(int8_model / ONNX_FILE, [arrays], tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError, match="at least one batch"):
        quantize_int8(int8_model / ONNX_FILE, [], tmp_path / "c.onnx")


def test_the_server_serves_int8_when_registered_with_it_and_refuses_int8_without_it(int8_model, tmp_path):
    assert engine_spec(ServeConfig(), int8_model, tmp_path).onnx_path == str(int8_model / INT8_ONNX_FILE)
    assert engine_spec(ServeConfig(precision="fp32"), int8_model, tmp_path).onnx_path == str(int8_model / ONNX_FILE)
    fp32_only = tmp_path / "fp32"
    shutil.copytree(int8_model, fp32_only, ignore=shutil.ignore_patterns(INT8_ONNX_FILE))
    assert engine_spec(ServeConfig(), fp32_only, tmp_path).precision == "fp32"
    with pytest.raises(ValueError, match="no model.int8.onnx"):
        engine_spec(ServeConfig(precision="int8"), fp32_only, tmp_path)
