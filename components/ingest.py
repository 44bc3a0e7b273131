from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(
    raw: Output[Dataset],
    source_uri: str,
    endpoint_url: str,
    anonymous: bool,
    file_list: str,
    limit: int,
    per_class: int,
    workers: int,
):
    """Fetch photos and metadata in the bucket's layout (S3, any endpoint, or a folder).

    ``limit``/``per_class`` of 0 and empty strings mean "not set". The output is a folder with
    ``bin-images/``, ``metadata/`` and ``manifest.jsonl``.
    """
    from bincounter import launch
    from bincounter.config import IngestConfig, SourceConfig

    cfg = IngestConfig(
        source=SourceConfig(uri=source_uri, endpoint_url=endpoint_url or None, anonymous=anonymous),
        file_list=file_list or None,
        limit=limit or None,
        per_class=per_class or None,
        workers=workers,
    )
    raw.metadata.update(launch.ingest(cfg, raw.path))
