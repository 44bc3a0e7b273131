"""People's counts kept like data: settling answers, append-only stores in a folder and on S3
(moto), a killed writer, concurrent writers, hostile files; and ingest and preprocess taking the
settled counts as labels, with their lineage."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bincounter.config import IngestConfig, PreprocessConfig, SourceConfig
from bincounter.data import bounded
from bincounter.data import reviews as R
from bincounter.data.ingest import ERRORS, MANIFEST, ingest
from bincounter.data.preprocess import preprocess, reviewed_lineage
from bincounter.ids import InvalidId
from bincounter_demo.s3server import LocalS3
from bincounter_demo.synth import SynthConfig, generate

SHA_A, SHA_B = "a" * 64, "b" * 64
BUCKET = "bc-test-reviews"


def answer(reviewer: str, count: int | None, sha: str = SHA_A, model: str = "models:/bincounter/3") -> R.Answer:
    return R.Answer.new(reviewer, count, sha, model)


def photo_sha(root: Path, id_: str) -> str:
    return hashlib.sha256((root / "bin-images" / f"{id_}.jpg").read_bytes()).hexdigest()


# -- what answers add up to ------------------------------------------------------------------


def test_one_answer_settles_and_a_disagreement_disputes_until_a_majority():
    one = R.settle([answer("ana", 3)])
    assert (one.status, one.count, one.reviewers) == ("settled", 3, ("ana",))
    two = R.settle([answer("ana", 3), answer("bo", 4)])
    assert (two.status, two.count, two.counts) == ("disputed", None, (3, 4))
    three = R.settle([answer("ana", 3), answer("bo", 4), answer("cy", 3)])
    assert (three.status, three.count) == ("settled", 3)
    # Two agreeing answers asked for: one is not enough, two are.
    assert R.settle([answer("ana", 3)], agreeing=2).status == "open"
    assert R.settle([answer("ana", 3), answer("bo", 3)], agreeing=2).count == 3


def test_a_persons_latest_answer_counts_once_and_only_for_the_photo_it_was_given_on():
    corrected = R.settle([answer("ana", 3), answer("ana", 4)])
    assert (corrected.count, corrected.counts) == (4, (4,))
    # ana's second answer (for photo B) does not outvote bo's, both on photo A
    on_a = R.settle([answer("ana", 3), answer("bo", 3), answer("ana", 5, SHA_B)], photo_sha256=SHA_A)
    assert on_a.count == 3
    replaced = R.settle([answer("ana", 3)], photo_sha256=SHA_B)
    assert (replaced.status, replaced.reviewers) == ("open", ())


def test_cant_tells_make_a_bin_unreadable_but_never_outvote_a_count():
    assert R.settle([answer("ana", None)]).status == "open"
    assert R.settle([answer("ana", None), answer("bo", None)]).status == "unreadable"
    assert R.settle([answer("ana", None), answer("bo", None), answer("cy", 2)]).count == 2


def test_answers_that_are_not_answers_are_refused():
    with pytest.raises(R.InvalidReview, match="reviewer"):
        R.Answer.new("../etc", 3, SHA_A)
    with pytest.raises(R.InvalidReview, match="count"):
        R.Answer.new("ana", -1, SHA_A)
    with pytest.raises(R.InvalidReview, match="count"):
        R.Answer.from_dict({**answer("ana", 3).to_dict(), "count": True})
    with pytest.raises(R.InvalidReview, match="sha256"):
        R.Answer.new("ana", 3, "not a sha")
    with pytest.raises(R.InvalidReview, match="time zone"):
        R.Answer.from_dict({**answer("ana", 3).to_dict(), "at": "2026-12-06T08:00:00"})
    with pytest.raises(R.InvalidReview, match="fields"):
        R.Answer.from_dict({**answer("ana", 3).to_dict(), "expected": 3})
    with pytest.raises(R.InvalidReview, match="not the reviews of bin 00002"):
        R.parse(R.dumps("00001", [answer("ana", 3)]), "00002")
    with pytest.raises(bounded.TooDeep):
        R.parse(b"[" * 10_000, "00001")


# -- the stores ------------------------------------------------------------------------------


def test_folder_answers_are_appended_never_rewritten_and_hostile_files_are_left_alone(tmp_path):
    store = R.FolderReviews(tmp_path)
    assert store.answers("00001") == [] and list(store.ids()) == []
    first, second = answer("ana", 3), answer("bo", 4)
    store.append("00001", first)
    assert store.append("00001", second) == [first, second]
    assert store.answers("00001") == [first, second] and list(store.ids()) == ["00001"]
    on_disk = json.loads((tmp_path / "reviews" / "00001.json").read_text())
    assert on_disk["id"] == "00001" and [a["reviewer"] for a in on_disk["answers"]] == ["ana", "bo"]
    with pytest.raises(InvalidId):
        store.append("../../etc/passwd", first)
    # Something else's file where a bin's reviews should be: refused, and left as it was.
    (tmp_path / "reviews" / "00002.json").write_text('{"not": "reviews"}')
    with pytest.raises(R.InvalidReview):
        store.append("00002", first)
    assert (tmp_path / "reviews" / "00002.json").read_text() == '{"not": "reviews"}'
    # A symlink out of the folder is never read (nor written through).
    secret = tmp_path / "secret.json"
    secret.write_text(R.dumps("00003", []).decode())
    (tmp_path / "reviews" / "00003.json").symlink_to(secret)
    with pytest.raises(bounded.OutsideFolder):
        store.append("00003", first)
    assert json.loads(secret.read_text())["answers"] == []


def test_concurrent_reviewers_on_one_bin_lose_no_answer(tmp_path):
    store = R.FolderReviews(tmp_path)
    written: list[str] = []
    lock = threading.Lock()

    def reviewer(name: str) -> None:
        for n in range(6):
            a = answer(name, n)
            store.append("00042", a)
            with lock:
                written.append(a.answer_id)

    threads = [threading.Thread(target=reviewer, args=(f"r{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = [a.answer_id for a in store.answers("00042")]
    assert sorted(kept) == sorted(written) and len(kept) == 36


_WRITER = textwrap.dedent("""
    import sys
    from bincounter.data.reviews import Answer, FolderReviews
    store = FolderReviews(sys.argv[1])
    n = 0
    while True:
        a = Answer.new("ana", n % 7, "a" * 64)
        store.append("00007", a)
        print(a.answer_id, flush=True)  # acknowledged: the append returned
        n += 1
""")


def test_a_killed_writer_loses_no_acknowledged_answer_and_leaves_the_file_whole(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    try:
        deadline = time.monotonic() + 60
        while len(acknowledged) < 40 and time.monotonic() < deadline:
            acknowledged.append(proc.stdout.readline().strip())
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # mid-write, most likely: it writes without pause
        proc.wait()
    acknowledged += [line.strip() for line in proc.stdout.read().splitlines()]
    assert len(acknowledged) >= 40
    kept = [a.answer_id for a in R.FolderReviews(tmp_path).answers("00007")]  # parses: whole
    assert set(acknowledged) <= set(kept)
    # The next writer is not blocked by the dead one's lock or leftovers.
    R.FolderReviews(tmp_path).append("00007", answer("bo", 1))


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch):
    """Signed requests (answers are written to a private bucket); moto takes any key."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.fixture(scope="module")
def s3():
    with LocalS3() as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


def _s3_store(s3, prefix: str = "floor") -> R.S3Reviews:
    cfg = SourceConfig(uri=f"s3://{BUCKET}/{prefix}", endpoint_url=s3.endpoint, anonymous=False)
    return R.open_reviews(cfg)


def test_on_s3_a_write_that_lost_a_race_reads_again_and_both_answers_land(s3, monkeypatch):
    store = _s3_store(s3)
    store.append("00005", answer("ana", 3))
    # bo reads the object, then cy's write lands before bo's: bo's conditional write must fail and retry.
    real_get = store._get
    raced = []

    def get_then_race(id_):
        got = real_get(id_)
        if not raced:
            raced.append(True)
            _s3_store(s3).append(id_, answer("cy", 4))
        return got

    monkeypatch.setattr(store, "_get", get_then_race)
    store.append("00005", answer("bo", 3))
    kept = _s3_store(s3).answers("00005")
    assert [a.reviewer for a in kept] == ["ana", "cy", "bo"]
    assert list(_s3_store(s3).ids()) == ["00005"]
    assert R.settle(kept).count == 3


def test_on_s3_a_write_retried_after_it_landed_is_kept_once(s3, monkeypatch):
    store = _s3_store(s3, "retried")
    first = answer("ana", 3)
    store.append("00008", first)
    # The answer's PUT landed but its reply was lost, and the retry found the object changed (412):
    # the next round reads the answer back and does not write it twice.
    assert store.append("00008", first) == [first]
    assert [a.answer_id for a in _s3_store(s3, "retried").answers("00008")] == [first.answer_id]


def test_on_s3_a_writer_that_always_loses_stores_nothing_and_says_so(s3, monkeypatch):
    store = _s3_store(s3, "busy")
    store.append("00006", answer("ana", 3))
    monkeypatch.setattr(R, "_RACES", 3)
    real_get = store._get
    monkeypatch.setattr(store, "_get", lambda id_: (real_get(id_)[0], '"stale-etag"'))
    with pytest.raises(R.WriteConflict, match="not stored"):
        store.append("00006", answer("bo", 4))
    assert [a.reviewer for a in _s3_store(s3, "busy").answers("00006")] == ["ana"]


# -- ingest and preprocess take the settled counts -------------------------------------------


@pytest.fixture
def floor(tmp_path) -> Path:
    root = tmp_path / "floor"
    generate(SynthConfig(n_images=60, image_size=64, seed=5), root)
    return root


def _manifest(folder: Path) -> dict[str, dict]:
    return {e["id"]: e for e in map(json.loads, (folder / MANIFEST).read_text().splitlines())}


def test_ingest_labels_settled_bins_with_peoples_counts_and_records_where_from(floor, tmp_path):
    record = {i: json.loads((floor / "metadata" / f"{i}.json").read_text())["EXPECTED_QUANTITY"]
              for i in ("00002", "00003", "00050", "00051")}
    store = R.FolderReviews(floor)
    person = (record["00002"] + 1) % 6
    store.append("00002", answer("ana", person, photo_sha(floor, "00002")))
    store.append("00003", answer("ana", 1, photo_sha(floor, "00003")))
    store.append("00003", answer("bo", 2, photo_sha(floor, "00003")))  # disputed: the record's count stays
    store.append("00050", answer("bo", 4, photo_sha(floor, "00050")))  # outside the selection: joins it
    store.append("00051", answer("bo", 4, SHA_B))  # about another photo
    (floor / "reviews" / "00052.json").write_text("{")  # unreadable

    plain = tmp_path / "plain"
    ingest(IngestConfig(source=SourceConfig(uri=str(floor)), limit=10, progress=False), plain)
    raw = tmp_path / "raw"
    result = ingest(IngestConfig(source=SourceConfig(uri=str(floor)), limit=10, reviews=str(floor), progress=False),
                    raw)
    assert result.reviewed == 2 and result.failed == 0
    entries = _manifest(raw)
    assert {"00050", "00051"} <= set(entries) and "00052" not in entries and len(entries) == 12
    two = entries["00002"]
    assert (two["count"], two["record_count"], two["label_source"]) == (person, record["00002"], "review")
    review_file = (floor / "reviews" / "00002.json").read_bytes()
    assert two["review"]["sha256"] == hashlib.sha256(review_file).hexdigest()
    assert two["review"]["reviewers"] == ["ana"] and two["review"]["models"] == ["models:/bincounter/3"]
    assert two["review"]["source"] == str(floor / "reviews" / "00002.json")
    assert (raw / "reviews" / "00002.json").read_bytes() == review_file
    assert entries["00050"]["label_source"] == "review" and entries["00050"]["count"] == 4
    assert "label_source" not in entries["00003"] and entries["00003"]["count"] == record["00003"]
    assert entries["00051"]["count"] == record["00051"] and "label_source" not in entries["00051"]
    errors = {e["id"]: e["reason"] for e in map(json.loads, (raw / ERRORS).read_text().splitlines())}
    assert errors == {"00051": "review_of_another_photo", "00052": "unreadable_review"}
    # The photos and records are the plain ingest's; only the labels (and so the digest) differ.
    assert {k: v for k, v in _manifest(plain)["00002"].items()} == \
        {k: v for k, v in two.items() if k not in ("count", "record_count", "label_source", "review")} | \
        {"count": record["00002"]}

    data = tmp_path / "data"
    preprocess(PreprocessConfig(image_size=32, workers=1, val_fraction=0.3, test_fraction=0.3), raw, data,
               progress=False)
    plain_data = tmp_path / "plain-data"
    preprocess(PreprocessConfig(image_size=32, workers=1, val_fraction=0.3, test_fraction=0.3), plain, plain_data,
               progress=False)
    index = {r["id"]: r for r in map(json.loads, (data / "index.jsonl").read_text().splitlines())}
    assert (index["00002"]["count"], index["00002"]["label_source"]) == (person, "review")
    assert index["00003"]["label_source"] == "metadata" and index["00003"]["count"] == record["00003"]
    info = json.loads((data / "dataset.json").read_text())
    assert sum(info["reviewed_labels"].values()) == 2
    assert info["input_manifest_sha256"] != json.loads((plain_data / "dataset.json").read_text())[
        "input_manifest_sha256"]
    lineage = {r["id"]: r for r in reviewed_lineage(data)}
    assert set(lineage) == {"00002", "00050"}
    assert lineage["00002"]["record_count"] == record["00002"] and lineage["00002"]["reviewers"] == "ana"
    assert lineage["00002"]["split"] == index["00002"]["split"]

    # Rerun after bo disagrees with ana: 00002 is no longer settled, its label and copy go.
    store.append("00002", answer("bo", (person + 1) % 6, photo_sha(floor, "00002")))
    again = ingest(IngestConfig(source=SourceConfig(uri=str(floor)), limit=10, reviews=str(floor), progress=False),
                   raw)
    assert again.downloaded == 0 and again.reviewed == 1
    assert _manifest(raw)["00002"]["count"] == record["00002"] and "record_count" not in _manifest(raw)["00002"]
    assert not (raw / "reviews" / "00002.json").exists()


def test_preprocess_keeps_the_records_count_when_the_photo_is_not_the_one_counted(floor, tmp_path):
    R.FolderReviews(floor).append("00002", answer("ana", 5, photo_sha(floor, "00002")))
    raw = tmp_path / "raw"
    ingest(IngestConfig(source=SourceConfig(uri=str(floor)), ids=("00002", "00004"), reviews=str(floor),
                        progress=False), raw)
    (raw / "bin-images" / "00002.jpg").write_bytes((floor / "bin-images" / "00004.jpg").read_bytes())
    data = tmp_path / "data"
    preprocess(PreprocessConfig(image_size=32, workers=1), raw, data, progress=False)
    quarantine = [json.loads(line) for line in (data / "quarantine.jsonl").read_text().splitlines()]
    index = {r["id"]: r for r in map(json.loads, (data / "index.jsonl").read_text().splitlines())}
    record = json.loads((floor / "metadata" / "00002.json").read_text())["EXPECTED_QUANTITY"]
    if "00002" in index:  # not dropped as the other's duplicate
        assert index["00002"]["label_source"] == "metadata" and index["00002"]["count"] == record
    assert any(q["id"] == "00002" and q["reason"] == "review_of_another_photo" for q in quarantine)


def test_ingest_reads_reviews_through_s3(s3, floor, tmp_path):
    s3.upload_folder(floor, BUCKET, "pods")
    store = _s3_store(s3, "pods")
    store.append("00009", answer("ana", 2, photo_sha(floor, "00009")))
    cfg = IngestConfig(source=SourceConfig(uri=f"s3://{BUCKET}/pods", endpoint_url=s3.endpoint, anonymous=False),
                       ids=("00001",), reviews=f"s3://{BUCKET}/pods", progress=False)
    result = ingest(cfg, tmp_path / "raw")
    entries = _manifest(tmp_path / "raw")
    assert result.reviewed == 1 and set(entries) == {"00001", "00009"}
    assert entries["00009"]["review"]["source"] == f"s3://{BUCKET}/pods/reviews/00009.json"
