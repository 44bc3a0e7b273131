"""The synthetic generator: deterministic, in the bucket's layout, and actually countable."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bincounter_demo.synth import SynthConfig, generate, make_metadata, render_bin

ASIN = re.compile(r"^B0[A-Z0-9]{8}$")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _counts(root: Path, ids: list[str]) -> np.ndarray:
    return np.array([json.loads((root / "metadata" / f"{i}.json").read_text())["EXPECTED_QUANTITY"] for i in ids])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    # Ties are rare for the continuous feature and the counts' ties only lower rho, so
    # plain ranks are enough (scipy is not a dependency).
    rank = lambda x: np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)  # noqa: E731
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], SynthConfig]:
    cfg = SynthConfig(n_images=24, max_count=5, image_size=64, seed=3)
    root = tmp_path_factory.mktemp("synth")
    return root, generate(cfg, root), cfg


def test_layout_and_ids(small_run: tuple[Path, list[str], SynthConfig]) -> None:
    root, ids, cfg = small_run
    assert ids == [f"{i:05d}" for i in range(1, cfg.n_images + 1)]
    assert ids[0] == "00001"
    assert sorted(p.name for p in (root / "bin-images").iterdir()) == [f"{i}.jpg" for i in ids]
    assert sorted(p.name for p in (root / "metadata").iterdir()) == [f"{i}.json" for i in ids]
    assert sorted(p.name for p in root.iterdir()) == ["bin-images", "metadata"]  # no temp files left


def test_images_decode_at_requested_size(small_run: tuple[Path, list[str], SynthConfig]) -> None:
    root, ids, cfg = small_run
    for i in ids:
        with Image.open(root / "bin-images" / f"{i}.jpg") as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == (cfg.image_size, cfg.image_size)
            im.load()


def test_metadata_schema(small_run: tuple[Path, list[str], SynthConfig]) -> None:
    root, ids, cfg = small_run
    for i in ids:
        meta = json.loads((root / "metadata" / f"{i}.json").read_text())
        assert list(meta) == ["BIN_FCSKU_DATA", "EXPECTED_QUANTITY"]
        count = meta["EXPECTED_QUANTITY"]
        assert isinstance(count, int) and 0 <= count <= cfg.max_count
        items = meta["BIN_FCSKU_DATA"]
        assert sum(item["quantity"] for item in items.values()) == count
        assert len(items) <= min(3, count)
        for asin, item in items.items():
            assert ASIN.match(asin) and item["asin"] == asin
            assert isinstance(item["quantity"], int) and item["quantity"] >= 1
            for dim in ("height", "length", "width"):
                assert item[dim]["unit"] == "IN"
                assert isinstance(item[dim]["value"], float) and item[dim]["value"] > 0
            assert item["weight"]["unit"] == "pounds" and item["weight"]["value"] > 0
            assert isinstance(item["name"], str) and item["name"]
            assert isinstance(item["normalizedName"], str) and item["normalizedName"]


@pytest.mark.parametrize("count", [1, 2, 3, 7, 40])
def test_make_metadata_splits_count(count: int) -> None:
    for seed in range(20):
        meta = make_metadata(count, np.random.default_rng(seed))
        items = meta["BIN_FCSKU_DATA"]
        assert meta["EXPECTED_QUANTITY"] == count
        assert sum(item["quantity"] for item in items.values()) == count
        assert 1 <= len(items) <= min(3, count)
        assert len({item["asin"] for item in items.values()}) == len(items)


def test_count_zero() -> None:
    meta = make_metadata(0, np.random.default_rng(0))
    assert meta == {"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": 0}
    assert render_bin(0, np.random.default_rng(0), 48).size == (48, 48)


def test_negative_count_rejected() -> None:
    with pytest.raises(ValueError):
        make_metadata(-1, np.random.default_rng(0))
    with pytest.raises(ValueError):
        render_bin(-1, np.random.default_rng(0), 48)


def test_render_bin_is_deterministic_given_rng() -> None:
    a = render_bin(4, np.random.default_rng(11), 80)
    b = render_bin(4, np.random.default_rng(11), 80)
    assert a.mode == "RGB" and a.size == (80, 80)
    assert a.tobytes() == b.tobytes()


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    cfg = SynthConfig(n_images=8, image_size=48, seed=5)
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    generate(cfg.model_copy(update={"seed": 6}), tmp_path / "c")
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".jpg"))


def test_image_i_does_not_depend_on_n_images(tmp_path: Path) -> None:
    cfg = SynthConfig(n_images=5, image_size=40, seed=9)
    generate(cfg, tmp_path / "short")
    generate(cfg.model_copy(update={"n_images": 9}), tmp_path / "long")
    short, long = _files(tmp_path / "short"), _files(tmp_path / "long")
    assert short == {k: long[k] for k in short}


def test_jpeg_quality_is_used(tmp_path: Path) -> None:
    cfg = SynthConfig(n_images=3, image_size=96, seed=1, jpeg_quality=95)
    generate(cfg, tmp_path / "hi")
    generate(cfg.model_copy(update={"jpeg_quality": 20}), tmp_path / "lo")
    size = lambda d: sum(p.stat().st_size for p in (tmp_path / d / "bin-images").iterdir())  # noqa: E731
    assert size("lo") < size("hi") / 2


def test_counts_cover_all_classes_evenly(tmp_path: Path) -> None:
    cfg = SynthConfig(n_images=36, max_count=5, image_size=32, seed=2)
    counts = _counts(tmp_path, generate(cfg, tmp_path))
    # Balanced per block of max_count + 1 ids: 36 images, 6 classes, exactly 6 each.
    assert np.bincount(counts, minlength=6).tolist() == [6] * 6


def test_max_count_zero(tmp_path: Path) -> None:
    cfg = SynthConfig(n_images=3, max_count=0, image_size=32)
    assert _counts(tmp_path, generate(cfg, tmp_path)).tolist() == [0, 0, 0]


def test_interrupted_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bincounter.fileio as fileio

    calls = {"n": 0}
    real_replace = fileio.os.replace

    def flaky_replace(src: str, dst: str) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the second image
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", flaky_replace)
    with pytest.raises(KeyboardInterrupt):
        generate(SynthConfig(n_images=4, image_size=32), tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["00001.jpg", "00001.json"]


def test_progress_bar_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate(SynthConfig(n_images=2, image_size=32), tmp_path, progress=True) == ["00001", "00002"]
    assert "synth" in capsys.readouterr().err


def _edge_density(path: Path) -> float:
    """Share of strong vertical edges in the centre: items add edges, the floor has few,
    and the near-horizontal straps and the side walls (cropped off) add almost none."""
    px = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    m = px.shape[0] // 7
    centre = px[m:-m, m:-m]
    return float((np.abs(np.diff(centre, axis=1)).max(axis=-1) > 20).mean())


def test_count_is_learnable_from_pixels(tmp_path: Path) -> None:
    """A one-number feature must rank the images by count; it cannot by chance.

    Under the null (feature unrelated to count) Spearman's rho over 120 images has a
    standard deviation of about 0.09, so rho > 0.7 is a ~8 sigma event.
    """
    cfg = SynthConfig(n_images=120, max_count=5, image_size=96, seed=0)
    ids = generate(cfg, tmp_path)
    counts = _counts(tmp_path, ids)
    feature = np.array([_edge_density(tmp_path / "bin-images" / f"{i}.jpg") for i in ids])

    rho = _spearman(counts, feature)
    assert rho > 0.7, rho
    # Empty bins stand apart from every non-empty class, and full bins from single items.
    means = [feature[counts == k].mean() for k in range(cfg.max_count + 1)]
    assert means[0] < min(means[1:]) and means[-1] > 2 * means[1], means
    # Control: the same feature against shuffled labels shows nothing.
    shuffled = np.random.default_rng(0).permutation(counts)
    assert abs(_spearman(shuffled, feature)) < 0.3


@pytest.mark.parametrize("count", [2, 5, 8])
def test_every_item_stays_visible(count: int) -> None:
    """Overlaps are allowed, but no item may be buried by the ones placed after it."""
    from bincounter_demo import synth

    size = 96
    for seed in range(10):
        rng = np.random.default_rng(seed)
        floor = (10.0, 8.0, 86.0, 82.0)
        items = synth._place_items(count, rng, size, floor)
        assert len(items) == count
        masks = [synth._polygon_mask(item.poly, (size, size)) for item in items]
        for k, mask in enumerate(masks):
            covered = np.zeros_like(mask)
            for later in masks[k + 1 :]:
                covered |= later
            visible = (mask & ~covered).sum() / mask.sum()
            assert visible >= synth._MIN_VISIBLE, (seed, k, visible)
