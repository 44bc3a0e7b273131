import pytest
from pydantic import ValidationError

from bincounter.config import IngestConfig, PipelineConfig, PreprocessConfig, TrainConfig


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError, match="extra"):
        TrainConfig(epoch=3)  # typo of "epochs"


def test_configs_are_frozen():
    cfg = TrainConfig()
    with pytest.raises(ValidationError):
        cfg.epochs = 2


def test_split_fractions_must_leave_training_data():
    with pytest.raises(ValidationError, match="room for training"):
        PreprocessConfig(val_fraction=0.5, test_fraction=0.5)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        ({}, ["0", "1", "2", "3", "4", "5"]),  # the ABID challenge setting
        ({"min_count": 1}, ["1", "2", "3", "4", "5"]),  # the seeds' setting
        ({"overflow": "class"}, ["0", "1", "2", "3", "4", "5", "6+"]),
    ],
)
def test_class_settings(kwargs, names):
    cfg = PreprocessConfig(**kwargs)
    assert cfg.class_names() == names
    assert cfg.num_classes == len(names)


def test_flat_params_cover_nested_configs():
    flat = PipelineConfig().flat()
    assert flat["ingest.source.uri"] == "s3://aft-vbi-pds"
    assert flat["train.backbone"] == "efficientnet_lite0"
    assert all("." in k or k in ("shards", "deploy_enabled", "pipeline_root") for k in flat)


def test_ingest_ids_keep_leading_zeros():
    assert IngestConfig(ids=("523", "00523")).ids == ("523", "00523")


def test_registry_metric_is_one_the_evaluation_reports():
    from pydantic import ValidationError

    from bincounter.config import EVAL_METRICS, RegisterConfig

    with pytest.raises(ValidationError):
        RegisterConfig(metric="acuracy")  # a typo once promoted every version
    assert "rmse" in EVAL_METRICS and "accuracy" in EVAL_METRICS
    assert RegisterConfig(metric="rmse").higher_is_better is False  # the metric's own direction
    assert RegisterConfig(metric="accuracy").higher_is_better is True
    assert RegisterConfig(metric="rmse", greater_is_better=True).higher_is_better is True
