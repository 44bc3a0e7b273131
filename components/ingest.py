from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(raw: Output[Dataset], config: dict, shard: int, shards: int):
    """Fetch photos and metadata in the bucket's layout (S3, any endpoint, or a folder).

    ``config`` is an ``IngestConfig``; this task keeps the selected ids of shard ``shard`` of
    ``shards`` (a hash of the id), so the shards together hold exactly the unsharded selection.
    The output is a folder with ``bin-images/``, ``metadata/`` and ``manifest.jsonl``.
    """
    from bincounter import launch
    from bincounter.config import IngestConfig

    cfg = IngestConfig.model_validate(config)
    raw.metadata["config"] = cfg.model_dump(mode="json")
    raw.metadata.update(launch.ingest(cfg, raw.path, shard=shard, shards=shards))
