import re
from pathlib import Path

import pytest

from bincounter.data.dataset import ShardDataset, materialize, read_samples, shard_urls
from bincounter.model.transforms import EvalTransform, TrainTransform


def test_shards_hold_images_with_labels(data_dir):
    samples = read_samples(shard_urls(data_dir, "train"))
    assert samples and all(0 <= label <= 5 for _, _, label in samples)
    ds = ShardDataset(samples, EvalTransform(size=48, mean=(0.5,) * 3, std=(0.5,) * 3))
    x, y = ds[0]
    assert x.shape == (3, 48, 48) and int(y) == samples[0][2]


def test_train_transform_keeps_size_and_varies():
    import torch

    img = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    t = TrainTransform(size=48, mean=(0.5,) * 3, std=(0.5,) * 3)
    a, b = t(img), t(img)
    assert a.shape == b.shape == (3, 48, 48) and not torch.equal(a, b)


def test_rot90_turns_about_half_the_photos_a_quarter():
    """A photo whose top half is bright keeps a horizontal edge under flips; a quarter turn makes it
    vertical. Without rot90 no output turns; with it, about half do."""
    import torch

    torch.manual_seed(0)
    img = torch.zeros(64, 3, 64, 80, dtype=torch.uint8)
    img[:, :, :32] = 255
    for rot90, expected in ((False, (0, 0)), (True, (20, 44))):
        t = TrainTransform(size=48, mean=(0.5,) * 3, std=(0.5,) * 3, rotation=0.0, jitter=0.0, hue=0.0, rot90=rot90)
        x = t(img).mean(dim=1)
        rows = (x[:, :24].mean(dim=(1, 2)) - x[:, 24:].mean(dim=(1, 2))).abs()
        cols = (x[:, :, :24].mean(dim=(1, 2)) - x[:, :, 24:].mean(dim=(1, 2))).abs()
        turned = int((cols > rows).sum())
        assert expected[0] <= turned <= expected[1], (rot90, turned)


def test_jpeg_bytes_kept_when_decoded_cache_would_not_fit(data_dir):
    samples = read_samples(shard_urls(data_dir, "val"))
    ds = ShardDataset(samples, EvalTransform(size=32, mean=(0.5,) * 3, std=(0.5,) * 3), cache_bytes=1)
    assert ds._decoded is None and ds[0][0].shape == (3, 32, 32)


def test_datasets_on_s3_are_cached_locally_once(data_dir, tmp_path, monkeypatch):
    from bincounter_demo.s3server import LocalS3

    with LocalS3() as s3:
        client = s3.client()
        client.create_bucket(Bucket="team")
        for path in data_dir.rglob("*"):
            if path.is_file():
                client.put_object(Bucket="team", Key=f"runs/1/data/{path.relative_to(data_dir)}", Body=path.read_bytes())
        for key, value in {"AWS_ENDPOINT_URL_S3": s3.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        local = materialize("s3://team/runs/1/data", cache=tmp_path)
        assert len(read_samples(shard_urls(local, "train"))) == len(read_samples(shard_urls(data_dir, "train")))
        (local / "dataset.json").touch()  # unchanged size: not fetched again
        before = {p: p.stat().st_mtime_ns for p in local.rglob("*.tar")}
        assert materialize("s3://team/runs/1/data", cache=tmp_path) == local
        assert before == {p: p.stat().st_mtime_ns for p in local.rglob("*.tar")}
        with pytest.raises(FileNotFoundError, match="dataset.json"):
            materialize("s3://team/nothing-here", cache=tmp_path)


def _s3_env(monkeypatch, s3) -> None:
    for key, value in {"AWS_ENDPOINT_URL_S3": s3.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)


def test_keys_that_would_escape_the_cache_are_refused_naming_them(tmp_path, monkeypatch):
    """S3 keys are names, not paths: '..' and a leading '/' are legal in a key and must never
    write outside the cache folder."""
    from bincounter.ids import InvalidId
    from bincounter_demo.s3server import LocalS3

    cache = tmp_path / "cache"
    with LocalS3() as s3:
        _s3_env(monkeypatch, s3)
        client = s3.client()
        client.create_bucket(Bucket="hostile")
        escapes = {"runs/1/data/../../escape.txt": tmp_path / "escape.txt",
                   f"runs/2/data/{tmp_path}/absolute.txt": tmp_path / "absolute.txt"}
        for key in escapes:
            prefix = key.split("/data/")[0] + "/data/"
            client.put_object(Bucket="hostile", Key=prefix + "dataset.json", Body=b"{}")
            client.put_object(Bucket="hostile", Key=key, Body=b"written outside the cache")
        for key, target in escapes.items():
            with pytest.raises(InvalidId, match=re.escape(repr(key))):
                materialize("s3://hostile/" + key.split("/data/")[0] + "/data", cache=cache)
            assert not target.exists()


def test_a_dataset_regenerated_at_the_same_uri_replaces_the_cached_copy_whole(data_dir, tmp_path, monkeypatch):
    """The cache is keyed on content (ETags): a new shard of the same size as the old one is
    fetched, and a file the new dataset no longer has is gone, so old and new never mix."""
    from bincounter_demo.s3server import LocalS3

    with LocalS3() as s3:
        _s3_env(monkeypatch, s3)
        client = s3.client()
        client.create_bucket(Bucket="regen")
        for path in data_dir.rglob("*"):
            if path.is_file():
                client.put_object(Bucket="regen", Key=f"ds/{path.relative_to(data_dir)}", Body=path.read_bytes())
        client.put_object(Bucket="regen", Key="ds/notes.txt", Body=b"only in the first version")
        local = materialize("s3://regen/ds", cache=tmp_path)
        assert (local / "notes.txt").exists()

        # The regenerated dataset: one shard has new bytes at exactly the old size, notes.txt is gone.
        shard = shard_urls(data_dir, "train")[0]
        relative = Path(shard).relative_to(data_dir).as_posix()
        old = Path(shard).read_bytes()
        new = old[:1024] + bytes(b ^ 0xFF for b in old[1024:2048]) + old[2048:]
        assert len(new) == len(old) and new != old
        client.put_object(Bucket="regen", Key=f"ds/{relative}", Body=new)
        client.delete_object(Bucket="regen", Key="ds/notes.txt")

        assert materialize("s3://regen/ds", cache=tmp_path) == local
        assert (local / relative).read_bytes() == new
        assert not (local / "notes.txt").exists()
        # Nothing else was fetched again.
        before = {p: p.stat().st_mtime_ns for p in local.rglob("*.tar")}
        materialize("s3://regen/ds", cache=tmp_path)
        assert before == {p: p.stat().st_mtime_ns for p in local.rglob("*.tar")}


def test_extra_targets_travel_with_their_samples_and_must_cover_each(data_dir):
    import numpy as np

    samples = read_samples(shard_urls(data_dir, "val"))
    rows = np.arange(len(samples) * 2, dtype=np.float32).reshape(-1, 2)
    ds = ShardDataset(samples, EvalTransform(size=32, mean=(0.5,) * 3, std=(0.5,) * 3), extras={"teacher": rows})
    _, y, extra = ds[3]
    assert int(y) == samples[3][2] and extra["teacher"].tolist() == [6.0, 7.0]
    with pytest.raises(ValueError, match="rows for"):
        ds.add_extra("aux", rows[:-1])
