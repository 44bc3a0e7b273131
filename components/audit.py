from kfp import dsl
from kfp.dsl import HTML, Dataset, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def audit(config: dict, results: Output[Dataset], metrics: Output[Metrics], report: Output[HTML]):
    """Count every bin of a pod and flag those whose count differs from the expected one.

    ``config`` is ``AuditConfig.model_dump(mode="json")``, validated on entry. ``results``
    holds audit.csv, audit.parquet, audit_errors.csv, summary.json and the journal; the
    summary figures go to ``metrics`` (and MLflow), the report to ``report``.
    """
    from bincounter import launch
    from bincounter.config import AuditConfig

    cfg = AuditConfig.model_validate(config)
    summary = launch.audit(cfg, results.path, report_html=report.path)
    for name, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(name, value)
    results.metadata.update({k: v for k, v in summary.items() if v is not None})
