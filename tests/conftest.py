"""Shared fixtures, one per concern. Data is generated here; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from bincounter.config import IngestConfig, PreprocessConfig, SourceConfig, TrainConfig
from bincounter_demo.synth import SynthConfig
from tests.width_model import WidthModel


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Each test gets its own working folder and MLflow store (no state leaks between tests)."""
    import mlflow

    home = tmp_path / "home"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    monkeypatch.setenv("BINCOUNTER_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    home.mkdir()
    # mlflow keeps the last set_tracking_uri/set_registry_uri for the whole process: without
    # this, a client in one test would talk to the registry an earlier test configured.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return home


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """480 synthetic photos (counts 0-5, balanced) in the bucket's layout."""
    from bincounter_demo.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(n_images=480, image_size=96, seed=7), out)
    return out


@pytest.fixture(scope="session")
def data_dir(synth_dir, tmp_path_factory) -> Path:
    """The synthetic photos ingested from a folder and preprocessed at 64 px."""
    from bincounter.data.ingest import ingest
    from bincounter.data.preprocess import preprocess

    work = tmp_path_factory.mktemp("data")
    ingest(IngestConfig(source=SourceConfig(uri=str(synth_dir)), progress=False), work / "raw")
    preprocess(PreprocessConfig(image_size=64, workers=1), work / "raw", work / "data", progress=False)
    return work / "data"


@pytest.fixture(scope="session")
def data_dir_without_val(synth_dir, tmp_path_factory) -> Path:
    """The synthetic photos preprocessed with val_fraction=0: no validation split."""
    from bincounter.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("data-no-val") / "data"
    preprocess(PreprocessConfig(image_size=64, workers=1, val_fraction=0.0), synth_dir, out, progress=False)
    return out


@pytest.fixture(scope="session")
def data_dir_overflow(tmp_path_factory) -> Path:
    """Synthetic photos of 0-8 items, preprocessed with a censored '6+' class."""
    from bincounter.data.preprocess import preprocess
    from bincounter_demo.synth import generate

    work = tmp_path_factory.mktemp("data-overflow")
    generate(SynthConfig(n_images=240, image_size=64, max_count=8, seed=3), work / "raw")
    preprocess(PreprocessConfig(image_size=48, workers=1, overflow="class"), work / "raw", work / "data",
               progress=False)
    return work / "data"


# 14 epochs: the tiny CNN is slow to start on 390 photos (6 left it within a few photos of the
# majority-class margin that test_training_learns_the_synthetic_counts asks for). The loss and
# augmentation settings are pinned so that tuning the real-photo defaults cannot move that margin.
TINY_TRAIN = TrainConfig(backbone="tiny_cnn", pretrained="none", image_size=64, epochs=14, batch_size=32, lr=3e-3,
                         workers=0, freeze_early=0, progress=False, tta=False, loss="ce+emd", label_smoothing=0.1,
                         rot90=False, class_weighting="none", ema_decay=0.998)


@pytest.fixture(scope="session")
def model_dir(data_dir, tmp_path_factory) -> Path:
    """A tiny CNN trained for a few epochs on the synthetic data."""
    from bincounter.training.train import train

    out = tmp_path_factory.mktemp("model")
    train(TINY_TRAIN, data_dir, out)
    return out


@pytest.fixture
def width_model() -> WidthModel:
    """The image-decoding fake model (tests/width_model.py): count = width // 8, 0.9 sure."""
    return WidthModel()


@pytest.fixture
def sagemaker_stub():
    """A SageMaker boto3 client wrapped in botocore's Stubber, which checks every request
    against SageMaker's API model; yields (client, stubber), then asserts every queued
    response was used. Fake credentials: nothing reaches AWS."""
    import botocore.session
    from botocore.stub import Stubber

    client = botocore.session.get_session().create_client(
        "sagemaker", region_name="eu-west-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()
