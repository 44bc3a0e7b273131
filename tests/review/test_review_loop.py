"""The whole review loop: a first pipeline run's champion audits the floor -> the review queue ->
a person counts 20 bins in the page (Chromium) -> the next pipeline run (kfp's local runner)
trains on those counts, and the labels' lineage is in MLflow."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from bincounter import launch
from bincounter.audit import review_queue
from bincounter.config import (AuditConfig, EvaluateConfig, IngestConfig, PipelineConfig, PreprocessConfig,
                               ReviewConfig, ReviewQueueConfig, SourceConfig, TrainConfig)
from bincounter.review.app import create_app
from bincounter.review.auth import add_reviewer
from bincounter_demo.synth import SynthConfig, generate
from tests.browser import headless_page
from tests.live_server import serving

QUEUED = 20


def _floor(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """120 bins, the records of every third one wrong (off by one): each bin's true and recorded count."""
    generate(SynthConfig(n_images=120, image_size=64, seed=9), root)
    true = {p.stem: json.loads(p.read_text())["EXPECTED_QUANTITY"] for p in (root / "metadata").glob("*.json")}
    recorded = dict(true)
    for id_ in sorted(true)[::3]:
        recorded[id_] = (true[id_] + 1) % 6
        (root / "metadata" / f"{id_}.json").write_text(json.dumps({"EXPECTED_QUANTITY": recorded[id_],
                                                                   "BIN_FCSKU_DATA": {}}))
    return true, recorded


def _run(floor: Path, **ingest) -> PipelineConfig:
    return PipelineConfig(
        ingest=IngestConfig(source=SourceConfig(uri=str(floor)), workers=4, **ingest),
        preprocess=PreprocessConfig(image_size=48, workers=1, val_fraction=0.2, test_fraction=0.3),
        train=TrainConfig(backbone="tiny_cnn", pretrained="none", image_size=48, epochs=1, workers=0,
                          freeze_early=0, tta=False),
        evaluate=EvaluateConfig(batch_size=32, latency_samples=2, int8=False),
        deploy_enabled=False,
    )


@pytest.fixture
def browser():
    """A desktop-sized page in headless Debian chromium; skipped when either is missing."""
    with headless_page({"width": 1024, "height": 720}) as page:
        yield page


def _count_in_the_page(tab, url: str, token: str, true: dict[str, int]) -> list[str]:
    """Sign in and count every bin the page gives, by keyboard; the ids counted, in order."""
    from playwright.sync_api import expect

    tab.goto(url + "/")
    tab.get_by_label("Reviewer token", exact=True).fill(token)
    tab.get_by_role("button", name="Sign in", exact=True).click()
    counted: list[str] = []
    while True:
        tab.locator("#photo:visible, #done:visible").first.wait_for()
        if tab.locator("#done").is_visible():
            return counted
        expect(tab.get_by_role("button", name="Save count", exact=True)).to_be_enabled()
        id_ = tab.locator("#bin-id").inner_text()
        expect(tab.locator(f"#photo[alt='Bin {id_}']")).to_be_visible()
        tab.keyboard.type(str(true[id_]))
        tab.keyboard.press("Enter")
        counted.append(id_)
        expect(tab.locator(f"#photo[alt='Bin {id_}']")).to_have_count(0)


@pytest.mark.slow
def test_twenty_bins_counted_in_the_page_are_the_next_runs_labels_with_their_lineage(browser, tmp_path,
                                                                                       isolated_home):
    from mlflow import MlflowClient

    from pipelines.runner import run_local

    floor = tmp_path / "floor"
    true, recorded = _floor(floor)
    tracking_uri = f"sqlite:///{isolated_home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)

    # 1. A first run's champion audits the floor; the day's queue is the 20 bins it is least sure of.
    run_local(_run(floor), tracking_uri, tmp_path / "kfp")
    first = client.get_model_version_by_alias("bincounter", "champion")
    audit = launch.audit(AuditConfig(source=SourceConfig(uri=str(floor)), tracking_uri=tracking_uri, track=False,
                                     progress=False, workers=4), str(tmp_path / "audit"))
    queue = review_queue.build(tmp_path / "audit", ReviewQueueConfig(budget=QUEUED, verdicts=("unsure", "mismatch",
                                                                                                "match")))
    queue_csv = review_queue.write(queue, tmp_path / "queue.csv")
    assert audit["checked"] == 120 and len(queue.entries) == QUEUED
    assert queue.model == f"models:/bincounter/{first.version}"

    # 2. A person counts them in the page.
    tokens = tmp_path / "reviewers.tokens"
    token = add_reviewer(tokens, "ana")
    cfg = ReviewConfig(source=SourceConfig(uri=str(floor), anonymous=False), tokens=str(tokens))
    with serving(create_app(cfg, queue_csv)) as url:
        counted = _count_in_the_page(browser, url, token, true)
    assert counted == [id_ for id_, _ in queue.entries]  # least sure first
    stored = {id_: json.loads((floor / "reviews" / f"{id_}.json").read_text())["answers"] for id_ in counted}
    assert all([(a["reviewer"], a["count"], a["model"]) for a in answers] == [("ana", true[id_], queue.model)]
               for id_, answers in stored.items())

    # 3. The next run ingests the reviews with the floor's photos and trains on them.
    run_local(_run(floor, reviews=str(floor)), tracking_uri, tmp_path / "kfp")
    version = client.get_model_version_by_alias("bincounter", "challenger")
    assert int(version.version) == int(first.version) + 1
    training = client.get_run(version.tags["lineage.training_run_id"])
    assert training.data.params["ingest.reviews"] == str(floor)
    assert training.data.tags["data.reviewed_labels"] == str(QUEUED)
    per_split = json.loads(training.data.params["data.reviewed_labels"].replace("'", '"'))
    assert sum(per_split.values()) == QUEUED
    lineage = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(
        training.info.run_id, "data/reviewed_labels.csv", str(tmp_path))).read_text())))
    assert sorted(r["id"] for r in lineage) == sorted(counted)
    for row in lineage:
        assert int(row["count"]) == true[row["id"]] and int(row["record_count"]) == recorded[row["id"]]
        assert row["reviewers"] == "ana" and row["models"] == queue.model and len(row["review_sha256"]) == 64
    assert training.data.metrics["test_reviewed_photos"] == per_split["test"]
    # The first run's training had none.
    assert client.get_run(first.tags["lineage.training_run_id"]).data.tags["data.reviewed_labels"] == "0"
