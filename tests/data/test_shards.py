"""Scale-out: ingest and preprocess over N shards give the dataset of one (bincounter.data.shards)."""

import json
import shutil
import warnings
from pathlib import Path

import pytest

from bincounter.config import IngestConfig, PipelineConfig, PreprocessConfig, SourceConfig
from bincounter_demo.synth import SynthConfig
from bincounter.data.shards import shard_indices
from bincounter.data.split import shard_of


def test_shards_split_the_id_space_evenly():
    ids = [f"{i:05d}" for i in range(3000)]
    sizes = [sum(shard_of(i, 3) == k for i in ids) for k in range(3)]
    assert sum(sizes) == 3000 and min(sizes) > 900
    assert all(shard_of(i, 1) == 0 for i in ids[:50])
    assert shard_indices(3) == [0, 1, 2]
    with pytest.raises(ValueError):
        shard_indices(0)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> Path:
    """Synthetic photos in the bucket's layout, with byte-identical copies under other ids
    (so duplicates fall in different shards) and a corrupt photo."""
    from bincounter_demo.synth import generate

    out = tmp_path_factory.mktemp("bucket")
    generate(SynthConfig(n_images=90, image_size=48, seed=5), out)
    for src, copies in (("00001", ("10001", "20001", "30001")), ("00002", ("10002", "20002"))):
        for copy in copies:
            shutil.copyfile(out / "bin-images" / f"{src}.jpg", out / "bin-images" / f"{copy}.jpg")
            shutil.copyfile(out / "metadata" / f"{src}.json", out / "metadata" / f"{copy}.json")
    (out / "bin-images" / "00003.jpg").write_bytes(b"not a jpeg")
    return out


def test_sharded_ingest_holds_exactly_the_unsharded_selection(bucket, tmp_path):
    from bincounter.data.ingest import ingest

    cfg = IngestConfig(source=SourceConfig(uri=str(bucket)), limit=60, progress=False)
    whole = ingest(cfg, tmp_path / "whole")
    parts = [ingest(cfg, tmp_path / f"part{k}", shard=k, shards=3) for k in range(3)]
    ids = lambda r: {json.loads(l)["id"] for l in r.manifest.read_text().splitlines()}  # noqa: E731
    assert set().union(*(ids(p) for p in parts)) == ids(whole) and len(ids(whole)) == 60
    assert sum(len(ids(p)) for p in parts) == 60  # disjoint
    with pytest.raises(ValueError):
        ingest(cfg, tmp_path / "bad", shard=3, shards=3)


def _run_data_pipeline(bucket: Path, root: Path, shards: int) -> Path:
    from kfp import local

    from pipelines.bincounter_pipeline import make_data_pipeline

    cfg = PipelineConfig(ingest=IngestConfig(source=SourceConfig(uri=str(bucket)), workers=4, progress=False),
                         preprocess=PreprocessConfig(image_size=32, workers=1, shard_size=16), shards=shards)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        task = make_data_pipeline(cfg)(ingest=cfg.ingest.params(), preprocess=cfg.preprocess.params(), shards=shards)
    return Path(task.output.path)


@pytest.mark.slow
def test_three_shards_on_the_local_runner_make_the_dataset_of_one(bucket, tmp_path):
    one = _run_data_pipeline(bucket, tmp_path / "one", 1)
    three = _run_data_pipeline(bucket, tmp_path / "three", 3)
    info1, info3 = (json.loads((d / "dataset.json").read_text()) for d in (one, three))
    assert info1["input_manifest_sha256"] == info3["input_manifest_sha256"] is not None
    assert info1 == info3  # sizes, classes, quarantine counts, shard names, config
    for name in ("index.jsonl", "input_manifest.jsonl"):
        assert (one / name).read_bytes() == (three / name).read_bytes(), name
    # Quarantine records alike too (PIL's own message for a corrupt photo names a memory address).
    records = [[(q["id"], q["reason"], q["detail"] if q["reason"] == "duplicate_image" else "")
                for q in map(json.loads, (d / "quarantine.jsonl").read_text().splitlines())] for d in (one, three)]
    assert records[0] == records[1]
    # The packed samples too, byte for byte: same split, same order.
    for split, names in info1["shards"].items():
        for name in names:
            assert (one / name).read_bytes() == (three / name).read_bytes(), name
    # And the test photos' originals evaluation scores as served, gathered from the shards.
    kept = [sorted((p.name, p.read_bytes()) for p in (d / "originals" / "bin-images").iterdir()) for d in (one, three)]
    assert kept[0] == kept[1] and len(kept[0]) == info1["sizes"]["test"]
    quarantine = [json.loads(l) for l in (three / "quarantine.jsonl").read_text().splitlines()]
    duplicates = {q["id"]: q["detail"] for q in quarantine if q["reason"] == "duplicate_image"}
    assert len(duplicates) == 5  # four photos alike and three alike: one of each is kept
    assert len({shard_of(i, 3) for i in ("00001", "10001", "20001", "30001")}) > 1  # copies in several shards
