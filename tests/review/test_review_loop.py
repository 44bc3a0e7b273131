"""The whole review loop: an audit's output -> the review queue -> a person counts 20 bins in the
page (Chromium) -> the next pipeline run (kfp's local runner) trains on those counts, and the
labels' lineage is in MLflow."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from bincounter.audit import review_queue
from bincounter.audit.outputs import COLUMNS, CSV_FILE, SUMMARY_FILE
from bincounter.config import (EvaluateConfig, IngestConfig, PipelineConfig, PreprocessConfig, ReviewConfig,
                               ReviewQueueConfig, SourceConfig, TrainConfig)
from bincounter.review.app import create_app
from bincounter.review.auth import add_reviewer
from bincounter_demo.synth import SynthConfig, generate
from tests.live_server import serving

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
QUEUED = 20
COUNTER = "models:/bincounter/1"


def _audited_floor(root: Path, audit_dir: Path) -> dict[str, int]:
    """120 bins; an audit (its audit.csv and summary.json, as the audit writes them) that doubted
    30 of them; the records of the bins it doubted most are wrong (off by one). Returns each bin's
    true count."""
    generate(SynthConfig(n_images=120, image_size=64, seed=9), root)
    true = {p.stem: json.loads(p.read_text())["EXPECTED_QUANTITY"] for p in (root / "metadata").glob("*.json")}
    ids = sorted(true)
    audit_dir.mkdir()
    with (audit_dir / CSV_FILE).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for n, id_ in enumerate(ids):
            doubted = n % 4 == 0
            w.writerow([id_, true[id_], true[id_], 0.5, 0.5, 0.30 + n / 1000 if doubted else 0.95,
                        "unsure" if doubted else "match"])
    (audit_dir / SUMMARY_FILE).write_text(json.dumps({"counter": COUNTER}))
    for id_ in [i for n, i in enumerate(ids) if n % 4 == 0][:QUEUED]:
        meta = root / "metadata" / f"{id_}.json"
        record = json.loads(meta.read_text())
        record["EXPECTED_QUANTITY"] = (true[id_] + 1) % 6  # the inventory is wrong about this bin
        record["BIN_FCSKU_DATA"] = {}
        meta.write_text(json.dumps(record))
    return true


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield chromium.new_context(viewport={"width": 1024, "height": 720}).new_page()
        finally:
            chromium.close()


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

    floor, audit_dir = tmp_path / "floor", tmp_path / "audit"
    true = _audited_floor(floor, audit_dir)

    # 1. From the audit's output, the day's queue: the 20 bins the model was least sure of.
    queue = review_queue.build(audit_dir, ReviewQueueConfig(budget=QUEUED))
    queue_csv = review_queue.write(queue, tmp_path / "queue.csv")
    assert len(queue.entries) == QUEUED and queue.model == COUNTER

    # 2. A person counts them in the page.
    tokens = tmp_path / "reviewers.tokens"
    token = add_reviewer(tokens, "ana")
    cfg = ReviewConfig(source=SourceConfig(uri=str(floor), anonymous=False), tokens=str(tokens))
    with serving(create_app(cfg, queue_csv)) as url:
        counted = _count_in_the_page(browser, url, token, true)
    assert counted == [id_ for id_, _ in queue.entries]  # least sure first
    stored = {id_: json.loads((floor / "reviews" / f"{id_}.json").read_text())["answers"] for id_ in counted}
    assert all([(a["reviewer"], a["count"], a["model"]) for a in answers] == [("ana", true[id_], COUNTER)]
               for id_, answers in stored.items())

    # 3. The next pipeline run ingests the reviews with the floor's photos and trains on them.
    tracking_uri = f"sqlite:///{isolated_home / 'mlflow.db'}"
    run = PipelineConfig(
        ingest=IngestConfig(source=SourceConfig(uri=str(floor)), reviews=str(floor), workers=4),
        preprocess=PreprocessConfig(image_size=48, workers=1, val_fraction=0.2, test_fraction=0.3),
        train=TrainConfig(backbone="tiny_cnn", pretrained="none", image_size=48, epochs=1, workers=0,
                          freeze_early=0, tta=False),
        evaluate=EvaluateConfig(batch_size=32, latency_samples=2, int8=False),
        deploy_enabled=False,
    )
    run_local(run, tracking_uri, tmp_path / "kfp")

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    version = client.get_model_version_by_alias("bincounter", "challenger")
    training = client.get_run(version.tags["lineage.training_run_id"])
    assert training.data.params["ingest.reviews"] == str(floor)
    assert training.data.tags["data.reviewed_labels"] == str(QUEUED)
    per_split = json.loads(training.data.params["data.reviewed_labels"].replace("'", '"'))
    assert sum(per_split.values()) == QUEUED
    lineage = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(
        training.info.run_id, "data/reviewed_labels.csv", str(tmp_path))).read_text())))
    assert sorted(r["id"] for r in lineage) == sorted(counted)
    for row in lineage:
        assert int(row["count"]) == true[row["id"]] and int(row["record_count"]) == (true[row["id"]] + 1) % 6
        assert row["reviewers"] == "ana" and row["models"] == COUNTER and len(row["review_sha256"]) == 64
    assert training.data.metrics["test_reviewed_photos"] == per_split["test"]
