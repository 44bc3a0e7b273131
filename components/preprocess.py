from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def preprocess(
    raw: Input[Dataset],
    data: Output[Dataset],
    report: Output[HTML],
    image_size: int,
    min_count: int,
    max_count: int,
    overflow: str,
    val_fraction: float,
    test_fraction: float,
):
    """Validate, clean, split by id hash, resize once and pack into webdataset shards.

    Rejected photos are listed with their reason in ``quarantine.jsonl``; ``report`` shows the
    class histogram, image sizes, samples per count and quarantine reasons.
    """
    from bincounter import launch
    from bincounter.config import PreprocessConfig

    cfg = PreprocessConfig(image_size=image_size, min_count=min_count, max_count=max_count, overflow=overflow,
                           val_fraction=val_fraction, test_fraction=test_fraction)
    data.metadata.update(launch.preprocess(cfg, raw.path, data.path, report_html=report.path))
