from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def preprocess(raw: Input[Dataset], data: Output[Dataset], report: Output[HTML], config: dict):
    """Validate, clean, split by id hash, resize once and pack into webdataset shards.

    ``config`` is a ``PreprocessConfig``. Rejected photos are listed with their reason in
    ``quarantine.jsonl``; ``report`` shows the class histogram, image sizes, samples per
    count and quarantine reasons.
    """
    from bincounter import launch
    from bincounter.config import PreprocessConfig

    cfg = PreprocessConfig.model_validate(config)
    data.metadata["config"] = cfg.model_dump(mode="json")
    data.metadata.update(launch.preprocess(cfg, raw.path, data.path, report_html=report.path))
