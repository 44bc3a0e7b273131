from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(model: Input[Model], data: Input[Dataset], results: Output[Dataset], metrics: Output[Metrics],
             confusion: Output[ClassificationMetrics], report: Output[HTML], config: dict, tracking_uri: str,
             experiment: str):
    """Score the model on the held-out test split: accuracy, RMSE, MAE, within-1, per-class
    F1, the 0-5 figures comparable with published results, calibration before and after, the
    verdict thresholds chosen for the model and what they do at a few error rates, and latency.
    ``config`` is an ``EvaluateConfig``. The headline figures are those of the served path:
    the test photos' originals, which preprocess keeps in ``data``, through the model server's
    engine; the shard path's are logged beside as ``shards_*``, and the photos whose label is a
    person's count (a review) apart as ``test_reviewed_*``."""
    from bincounter import launch
    from bincounter.config import EvaluateConfig

    cfg = EvaluateConfig.model_validate(config)
    results.metadata["config"] = cfg.model_dump(mode="json")
    out = launch.evaluate(cfg, model.path, data.path, results.path, tracking_uri=tracking_uri or None,
                          experiment=experiment, run_id=model.metadata.get("mlflow_run_id"), report_html=report.path)
    # test_reviewed_*: the photos labelled by people on the floor (bincounter review), apart.
    for name, value in {**out["summary"], **out["comparison"], **out["verdicts"], **out["reviewed"]}.items():
        metrics.log_metric(name, value)
    confusion.log_confusion_matrix(out["class_names"], out["confusion_matrix"])
    results.metadata.update({**out["summary"], **out["comparison"], "path": out["path"]})
