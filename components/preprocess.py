from typing import List

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def preprocess(raw: Input[Dataset], data: Output[Dataset], report: Output[HTML], config: dict):
    """Validate, clean, split by id hash, resize once and pack one ingest shard.

    ``config`` is a ``PreprocessConfig``. Rejected photos are listed with their reason in
    ``quarantine.jsonl``; ``merge_shards`` joins the shards into the training dataset (on a
    backend without ``dsl.Collected`` the one shard is the dataset). ``report`` is the shard's.
    """
    from bincounter import launch
    from bincounter.config import PreprocessConfig

    cfg = PreprocessConfig.model_validate(config)
    data.metadata["config"] = cfg.model_dump(mode="json")
    data.metadata.update(launch.preprocess(cfg, raw.path, data.path, report_html=report.path))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def merge_shards(parts: Input[List[Dataset]], data: Output[Dataset], report: Output[HTML], config: dict):
    """Join the preprocessed shards into one dataset, exactly the one an unsharded preprocess
    makes (same order, duplicates across shards quarantined, same manifest hash and split).
    ``report`` shows the class histogram, image sizes, samples per count and quarantine reasons."""
    from bincounter import launch
    from bincounter.config import PreprocessConfig

    cfg = PreprocessConfig.model_validate(config)
    data.metadata["config"] = cfg.model_dump(mode="json")
    data.metadata.update(launch.merge_shards(cfg, [p.path for p in parts], data.path, report_html=report.path))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def shard_indices(shards: int) -> List[int]:
    """The shard numbers 0..shards-1 the data stages fan out over."""
    from bincounter.data.shards import shard_indices as indices

    return indices(shards)
