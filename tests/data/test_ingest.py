"""Ingest against a real local S3 server (moto on loopback) holding photos in the real layout.

Requests go through ``S3Proxy``, which records each one (signed or not, which key) and can
inject S3's failure modes: 503 SlowDown, 500, connection resets and bodies cut short.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from bincounter.data import ingest as ingest_mod
from bincounter.config import IngestConfig, SourceConfig
from bincounter.data.ingest import ERRORS, MANIFEST, ingest, load_manifest
from bincounter.ids import InvalidId
from bincounter.data.sources import LocalSource, S3Source, SourceError
from bincounter_demo.s3server import LocalS3, S3Proxy, free_port
from bincounter_demo.synth import SynthConfig, generate

BUCKET = "bc-test-ingest"  # moto's state is per process: a name no other test module uses
N_SYNTH = 60
PREFIX = "data/v1"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 synthetic photos plus '523' and '00523': different photos whose ids differ by zeros."""
    root = tmp_path_factory.mktemp("bucket")
    generate(SynthConfig(n_images=N_SYNTH, image_size=64, seed=11), root)
    for new, old in (("523", "00007"), ("00523", "00008")):
        for sub, ext in (("bin-images", ".jpg"), ("metadata", ".json")):
            shutil.copy(root / sub / f"{old}{ext}", root / sub / f"{new}{ext}")
    return root


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    """Three good ids and one metadata object whose image was never uploaded."""
    root = tmp_path_factory.mktemp("broken")
    for sub in ("bin-images", "metadata"):
        (root / sub).mkdir()
    for id_ in ("00001", "00002", "00003"):
        shutil.copy(dataset / "bin-images" / f"{id_}.jpg", root / "bin-images" / f"{id_}.jpg")
        shutil.copy(dataset / "metadata" / f"{id_}.json", root / "metadata" / f"{id_}.json")
    shutil.copy(dataset / "metadata" / "00004.json", root / "metadata" / "00004.json")  # its image is not
    return root


@pytest.fixture(scope="module")
def s3(dataset: Path, broken: Path):
    with LocalS3() as server:
        server.upload_folder(dataset, BUCKET)
        server.upload_folder(dataset, BUCKET, prefix=PREFIX)
        server.upload_folder(broken, BUCKET, prefix="broken")
        yield server


@pytest.fixture
def proxy(s3: LocalS3):
    with S3Proxy(s3.endpoint) as p:
        yield p


def _cfg(endpoint: str, uri: str = f"s3://{BUCKET}", **kw) -> IngestConfig:
    source = kw.pop("source", {})
    return IngestConfig(source=SourceConfig(uri=uri, endpoint_url=endpoint, **source), progress=False, **kw)


def _all_ids(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "metadata").glob("*.json"))


def _count(root: Path, id_: str) -> int:
    return json.loads((root / "metadata" / f"{id_}.json").read_text())["EXPECTED_QUANTITY"]


def _assert_verified(out: Path, dataset: Path) -> dict[str, dict]:
    """Every manifest entry matches its files and the source's bytes; no temp files anywhere."""
    manifest = load_manifest(out / MANIFEST)
    for id_, entry in manifest.items():
        image = (out / "bin-images" / f"{id_}.jpg").read_bytes()
        meta = (out / "metadata" / f"{id_}.json").read_bytes()
        assert image == (dataset / "bin-images" / f"{id_}.jpg").read_bytes()
        assert meta == (dataset / "metadata" / f"{id_}.json").read_bytes()
        assert entry["sha256"] == _sha(image) and entry["bytes"] == len(image)
        assert entry["metadata_sha256"] == _sha(meta)
        assert entry["count"] == _count(dataset, id_)
    assert not [p for p in out.rglob("*.part")]
    return manifest


# --------------------------------------------------------------------------- selection


def test_full_listing_counts_match_metadata_and_manifest_is_correct(proxy, dataset, tmp_path):
    result = ingest(_cfg(proxy.endpoint), tmp_path)

    ids = _all_ids(dataset)
    assert (result.downloaded, result.skipped, result.failed) == (len(ids), 0, 0)
    manifest = _assert_verified(tmp_path, dataset)
    assert sorted(manifest) == ids
    assert set(manifest["00001"]) == {"id", "count", "bytes", "sha256", "metadata_sha256", "source_key"}
    assert manifest["00523"]["source_key"] == "bin-images/00523.jpg"
    assert result.counts == dict(sorted(Counter(str(_count(dataset, i)) for i in ids).items()))
    assert (tmp_path / ERRORS).read_text() == ""
    # Listed once, then each object fetched exactly once.
    assert Counter(r.key for r in proxy.gets()) == Counter(
        [f"metadata/{i}.json" for i in ids] + [f"bin-images/{i}.jpg" for i in ids])


def test_anonymous_requests_are_unsigned(proxy, tmp_path):
    ingest(_cfg(proxy.endpoint, limit=3), tmp_path)
    assert proxy.requests and not any(r.signed for r in proxy.requests)


@pytest.fixture
def profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An AWS profile named "ci" (moto takes any key); nothing from the real environment."""
    creds = tmp_path / "aws-credentials"
    creds.write_text("[ci]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    return "ci"


def test_profile_requests_are_signed(proxy, tmp_path, profile):
    ingest(_cfg(proxy.endpoint, limit=2, source={"profile": profile}), tmp_path / "out")
    assert proxy.requests and all(r.signed for r in proxy.requests)


def test_prefix(proxy, dataset, tmp_path):
    result = ingest(_cfg(proxy.endpoint, uri=f"s3://{BUCKET}/{PREFIX}/", limit=4), tmp_path)
    manifest = _assert_verified(tmp_path, dataset)
    assert result.downloaded == 4
    assert manifest["00001"]["source_key"] == f"{PREFIX}/bin-images/00001.jpg"
    assert all(r.key.startswith(f"{PREFIX}/") for r in proxy.gets())


def test_exact_ids_523_and_00523_are_different_objects(proxy, dataset, tmp_path):
    ingest(_cfg(proxy.endpoint, ids=("523",)), tmp_path / "one")
    assert sorted(load_manifest(tmp_path / "one" / MANIFEST)) == ["523"]
    assert [r.key for r in proxy.gets("bin-images/")] == ["bin-images/523.jpg"]

    ingest(_cfg(proxy.endpoint, ids=("00523", "523", "00523")), tmp_path / "both")
    manifest = _assert_verified(tmp_path / "both", dataset)
    assert sorted(manifest) == ["00523", "523"]
    assert manifest["523"]["sha256"] != manifest["00523"]["sha256"]


def test_file_list_selection(proxy, dataset, tmp_path):
    file_list = tmp_path / "file_list.json"
    file_list.write_text(json.dumps({
        "1": ["data/metadata/00003.json", "data/metadata/00523.json"],
        "2": ["data/metadata/00010.json", "data/metadata/99999.json"],  # 99999 is not in the bucket
    }))
    result = ingest(_cfg(proxy.endpoint, file_list=str(file_list)), tmp_path / "out")
    assert sorted(_assert_verified(tmp_path / "out", dataset)) == ["00003", "00010", "00523"]
    assert result.failed == 1
    errors = [json.loads(line) for line in (tmp_path / "out" / ERRORS).read_text().splitlines()]
    assert [(e["id"], e["reason"]) for e in errors] == [("99999", "missing_metadata")]


def test_first_n_in_listing_order(proxy, dataset, tmp_path):
    result = ingest(_cfg(proxy.endpoint, limit=5), tmp_path)
    assert result.downloaded == 5
    assert sorted(load_manifest(tmp_path / MANIFEST)) == _all_ids(dataset)[:5]
    assert len(proxy.gets()) == 10  # no object beyond the first five is fetched


def test_per_class_balance_reads_each_metadata_once(proxy, dataset, tmp_path):
    result = ingest(_cfg(proxy.endpoint, per_class=3, max_count=5), tmp_path)
    assert result.counts == {str(c): 3 for c in range(6)}
    _assert_verified(tmp_path, dataset)
    meta_gets = Counter(r.key for r in proxy.gets("metadata/"))
    assert max(meta_gets.values()) == 1  # the selection's read is reused for the download
    assert len(proxy.gets("bin-images/")) == 18
    # Selection follows listing order, so it is the same on every run.
    expected = []
    for id_ in _all_ids(dataset):
        if sum(1 for e in expected if _count(dataset, e) == _count(dataset, id_)) < 3:
            expected.append(id_)
    assert sorted(load_manifest(tmp_path / MANIFEST)) == sorted(expected)


def test_listing_is_paginated_and_streamed(proxy, dataset, monkeypatch):
    monkeypatch.setattr(S3Source, "page_size", 7)
    source = S3Source(SourceConfig(uri=f"s3://{BUCKET}", endpoint_url=proxy.endpoint))
    ids = source.iter_ids()
    assert next(ids) == "00001"
    assert sum("list-type" in r.path for r in proxy.requests) == 1  # one page fetched so far
    rest = list(ids)
    assert ["00001", *rest] == _all_ids(dataset)
    pages = -(-len(_all_ids(dataset)) // 7)
    assert sum("list-type" in r.path for r in proxy.requests) == pages


def test_endpoint_from_the_environment_serves_listing_and_objects(proxy, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    result = ingest(IngestConfig(source=SourceConfig(uri=f"s3://{BUCKET}"), limit=3, progress=False), tmp_path)
    assert result.downloaded == 3 and len(proxy.gets()) == 6
    _assert_verified(tmp_path, dataset)


def test_local_folder_source(dataset, tmp_path):
    result = ingest(IngestConfig(source=SourceConfig(uri=str(dataset)), progress=False), tmp_path)
    assert result.downloaded == len(_all_ids(dataset))
    _assert_verified(tmp_path, dataset)


# --------------------------------------------------------------------------- failures


def test_unreachable_endpoint_fails_fast_naming_it(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # bound once, then closed: nothing listens
    start = time.monotonic()
    with pytest.raises(SourceError, match=f"s3://{BUCKET}/ at {endpoint}"):
        ingest(_cfg(endpoint, retries=1, connect_timeout=1), tmp_path)
    assert time.monotonic() - start < 10


def test_local_folder_not_in_bucket_layout(tmp_path):
    with pytest.raises(SourceError, match="metadata"):
        ingest(IngestConfig(source=SourceConfig(uri=str(tmp_path)), progress=False), tmp_path / "out")


def test_metadata_without_image_is_recorded_not_fatal(proxy, dataset, tmp_path):
    result = ingest(_cfg(proxy.endpoint, uri=f"s3://{BUCKET}/broken"), tmp_path)
    assert (result.downloaded, result.failed) == (3, 1)
    errors = [json.loads(line) for line in (tmp_path / ERRORS).read_text().splitlines()]
    assert [(e["id"], e["reason"]) for e in errors] == [("00004", "missing_image")]
    assert "broken/bin-images/00004.jpg" in errors[0]["detail"]
    assert not (tmp_path / "metadata" / "00004.json").exists()  # no half pair on disk
    assert sorted(_assert_verified(tmp_path, dataset)) == ["00001", "00002", "00003"]


@pytest.mark.parametrize("signed", [False, True], ids=["anonymous", "profile"])
def test_metadata_objects_over_the_size_limit_are_recorded_and_the_rest_fetched(s3, dataset, tmp_path, request, signed):
    """Both request paths refuse an object from its Content-Length; the next object on the same
    connection pool still arrives whole."""
    source = {"profile": request.getfixturevalue("profile")} if signed else {}
    client = s3.client()
    for id_ in ("00001", "00002"):
        for key in (f"metadata/{id_}.json", f"bin-images/{id_}.jpg"):
            client.put_object(Bucket=BUCKET, Key=f"big/{key}", Body=(dataset / key).read_bytes())
    client.put_object(Bucket=BUCKET, Key="big/metadata/00001.json",
                      Body=json.dumps({"EXPECTED_QUANTITY": 1, "pad": "x" * 5000}).encode())
    result = ingest(_cfg(s3.endpoint, uri=f"s3://{BUCKET}/big", source=source, max_metadata_bytes=4096, workers=1),
                    tmp_path)
    errors = [json.loads(line) for line in (tmp_path / ERRORS).read_text().splitlines()]
    assert [(e["id"], e["reason"]) for e in errors] == [("00001", "metadata_too_large")]
    assert "over the limit of 4096" in errors[0]["detail"]
    assert (result.downloaded, result.failed) == (1, 1)
    assert sorted(_assert_verified(tmp_path, dataset)) == ["00002"]


@pytest.mark.parametrize("signed", [False, True], ids=["anonymous", "profile"])
def test_throttling_5xx_resets_and_cut_bodies_are_retried(s3, dataset, tmp_path, request, signed):
    """A third of the objects fail on their first request, each in one of S3's ways; both
    request paths (plain HTTP for anonymous reads, boto3 when signed) retry them all."""
    source = {"profile": request.getfixturevalue("profile")} if signed else {}
    kinds = ["slowdown", "internal", "unavailable", "reset", "truncate"]
    attempts: Counter[str] = Counter()
    injected: dict[str, str] = {}

    def fault(method: str, path: str, n: int) -> str | None:
        if "list-type" in path or "?" in path:
            return None
        key = path.split("?")[0]
        attempts[key] += 1
        if attempts[key] == 1 and int(_sha(key.encode()), 16) % 3 == 0:
            injected[key] = kinds[len(injected) % len(kinds)]
            return injected[key]
        return None

    with S3Proxy(s3.endpoint, fault=fault) as proxy:
        result = ingest(_cfg(proxy.endpoint, source=source), tmp_path / "out")
    assert all(r.signed == signed for r in proxy.requests)

    assert (result.downloaded, result.failed) == (len(_all_ids(dataset)), 0)
    _assert_verified(tmp_path / "out", dataset)
    assert len(injected) >= 20 and set(injected.values()) == set(kinds)
    assert result.retries == len(injected)
    assert all(attempts[key] == 2 for key in injected)  # retried once, then it arrived


def test_a_burst_of_errors_longer_than_botocores_retry_quota(s3, dataset, tmp_path):
    """The first 60 object requests fail: botocore's standard mode would give up on every
    request once its shared quota (~35 retries) is spent; each object must still arrive.
    Counted in requests, not seconds, so a loaded machine sees the same burst; no key fails
    more than 4 times in a row, well within ingest's 8 retries per object."""
    budget = 60
    failed: Counter[str] = Counter()

    def fault(method: str, path: str, n: int) -> str | None:
        if "list-type" in path or sum(failed.values()) >= budget:
            return None
        key = path.split("?")[0]
        if failed[key] >= 4:
            return None
        failed[key] += 1
        return "internal"

    with S3Proxy(s3.endpoint, fault=fault) as proxy:
        result = ingest(_cfg(proxy.endpoint, ids=tuple(_all_ids(dataset)[:30])), tmp_path)
    assert (result.downloaded, result.failed) == (30, 0)
    assert sum(r.fault == "internal" for r in proxy.requests) == budget
    assert result.retries == budget
    _assert_verified(tmp_path, dataset)


def test_errors_that_are_not_transient_are_not_retried(s3, tmp_path):
    with S3Proxy(s3.endpoint) as proxy:
        result = ingest(_cfg(proxy.endpoint, ids=("00001", "99999")), tmp_path)
    assert result.failed == 1 and result.retries == 0
    assert sum(r.key == "metadata/99999.json" for r in proxy.gets()) == 1


def test_a_second_ingest_into_the_same_folder_is_refused(dataset, tmp_path):
    from filelock import FileLock

    with FileLock(str(tmp_path / ".ingest.lock")):
        with pytest.raises(RuntimeError, match="another ingest"):
            ingest(IngestConfig(source=SourceConfig(uri=str(dataset)), progress=False), tmp_path)


# --------------------------------------------------------------------------- resume


class _PowerCut(Exception):
    """Not a SourceError: ingest must not swallow it."""


def test_interrupted_ingest_resumes_without_downloading_twice(dataset, tmp_path, monkeypatch):
    reads: Counter[str] = Counter()

    class Flaky(LocalSource):
        cut_after: int | None = 40

        def read(self, key: str, max_bytes: int | None = None) -> bytes:
            if self.cut_after is not None and sum(reads.values()) >= self.cut_after:
                raise _PowerCut(key)
            reads[key] += 1
            return super().read(key, max_bytes)

    source = Flaky(dataset)
    monkeypatch.setattr(ingest_mod, "open_source", lambda cfg, **kw: source)
    cfg = IngestConfig(source=SourceConfig(uri=str(dataset)), workers=4, progress=False)
    with pytest.raises(_PowerCut):
        ingest(cfg, tmp_path)
    done = set(load_manifest(tmp_path / MANIFEST))
    assert 0 < len(done) < len(_all_ids(dataset))

    source.cut_after = None
    first_run = Counter(reads)
    result = ingest(cfg, tmp_path)
    second_run = reads - first_run
    assert result.skipped == len(done) and result.downloaded == len(_all_ids(dataset)) - len(done)
    assert not any(key.rsplit("/", 1)[-1].split(".")[0] in done for key in second_run)
    assert sorted(_assert_verified(tmp_path, dataset)) == _all_ids(dataset)


_KILLABLE = textwrap.dedent("""
    import sys
    from bincounter.config import IngestConfig, SourceConfig
    from bincounter.data.ingest import ingest
    ingest(IngestConfig(source=SourceConfig(uri=sys.argv[1], endpoint_url=sys.argv[2]), workers=4,
                        progress=False), sys.argv[3])
""")


def test_killed_ingest_resumes_verified_and_downloads_only_what_is_missing(s3, dataset, tmp_path):
    out = tmp_path / "out"
    with S3Proxy(s3.endpoint, latency=0.03) as proxy:  # slow enough to kill it halfway
        proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, f"s3://{BUCKET}", proxy.endpoint, str(out)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            manifest = out / MANIFEST
            if manifest.exists() and manifest.read_text().count("\n") >= 15:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the ingest finished before it could be killed"

        journaled = set(load_manifest(out / MANIFEST))
        before = Counter(r.key for r in proxy.gets("bin-images/"))
        result = ingest(_cfg(proxy.endpoint), out)
        after = Counter(r.key for r in proxy.gets("bin-images/")) - before

    ids = _all_ids(dataset)
    assert 15 <= len(journaled) < len(ids)
    assert result.skipped == len(journaled) and result.downloaded == len(ids) - len(journaled)
    # Nothing recorded as done is fetched again; everything else is fetched exactly once.
    assert after == Counter(f"bin-images/{i}.jpg" for i in ids if i not in journaled)
    assert sorted(_assert_verified(out, dataset)) == ids
    assert not [n for n in os.listdir(out / "bin-images") if n.startswith(".")]


def test_a_file_changed_after_download_is_fetched_again(dataset, tmp_path):
    cfg = IngestConfig(source=SourceConfig(uri=str(dataset)), ids=("00001", "00002"), progress=False)
    ingest(cfg, tmp_path)
    image = tmp_path / "bin-images" / "00002.jpg"
    image.write_bytes(image.read_bytes()[:-10] + b"\0" * 10)  # same size, different bytes
    result = ingest(cfg, tmp_path)
    assert (result.skipped, result.downloaded) == (1, 1)
    _assert_verified(tmp_path, dataset)


# --------------------------------------------------------------------------- hostile ids

HOSTILE_IDS = ["../../outside/00001", "/etc/passwd", "00001/../00002", "..", "abc", "", "１２３", "00001\n"]


@pytest.mark.parametrize("bad", HOSTILE_IDS)
def test_configured_ids_that_are_not_dataset_ids_are_refused_naming_them(dataset, bad):
    with pytest.raises(ValueError, match=f"invalid id {re.escape(repr(bad))}"):
        IngestConfig(source=SourceConfig(uri=str(dataset)), ids=("00001", bad))


def test_an_id_never_reaches_a_path_or_key_unchecked(s3, dataset, tmp_path):
    """The last gate, whatever the caller: a source builds no key from a hostile id, so the
    local source reads nothing outside its folder and ingest writes nothing outside its own."""
    for source in (LocalSource(dataset), S3Source(SourceConfig(uri=f"s3://{BUCKET}", endpoint_url=s3.endpoint))):
        for bad in ("../bin-images/00001", "../../x", "/etc/passwd"):
            with pytest.raises(InvalidId, match=re.escape(repr(bad))):
                source.key("bin-images", bad)
    with pytest.raises(InvalidId):
        ingest_mod._fetch_one(LocalSource(dataset / "metadata"), tmp_path / "out", "../metadata/00001", IngestConfig())
    assert not (tmp_path / "out").exists()


def test_a_file_list_with_a_bad_id_is_refused_before_any_download(proxy, tmp_path):
    file_list = tmp_path / "file_list.json"
    file_list.write_text(json.dumps({"1": ["data/metadata/00003.json", "data/metadata/x..json"]}))
    with pytest.raises(ValueError, match=r"invalid id 'x\.'.*file_list\.json.*x\.\.json"):
        ingest(_cfg(proxy.endpoint, file_list=str(file_list)), tmp_path / "out")
    assert not proxy.gets()
    assert not (tmp_path / "out" / "metadata").exists()


def test_listed_names_that_are_not_dataset_ids_are_skipped_with_a_warning(s3, proxy, dataset, tmp_path, caplog):
    """A bucket (or folder) may hold anything under metadata/: only digit ids are the dataset's."""
    client = s3.client()
    hostile = ["metadata/..json", "metadata/notes.json", "metadata/a b.json", "metadata/00001.json.bak"]
    for key in ("metadata/00001.json", "bin-images/00001.jpg"):
        client.put_object(Bucket=BUCKET, Key=f"hostile/{key}", Body=(dataset / key).read_bytes())
    for key in hostile:
        client.put_object(Bucket=BUCKET, Key=f"hostile/{key}", Body=(dataset / "metadata/00002.json").read_bytes())
    with caplog.at_level("WARNING", logger="bincounter.data.sources"):
        result = ingest(_cfg(proxy.endpoint, uri=f"s3://{BUCKET}/hostile"), tmp_path / "s3")
    assert (result.downloaded, result.failed) == (1, 0)
    assert sorted(load_manifest(tmp_path / "s3" / MANIFEST)) == ["00001"]
    assert "notes.json" in caplog.text and "a b.json" in caplog.text

    local = tmp_path / "folder"
    for key in ("metadata/00001.json", "bin-images/00001.jpg", *hostile):
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(dataset / (key if key.endswith(("00001.json", ".jpg")) else "metadata/00002.json"), local / key)
    result = ingest(IngestConfig(source=SourceConfig(uri=str(local)), progress=False), tmp_path / "local")
    assert (result.downloaded, result.failed) == (1, 0)


def test_a_manifest_line_with_a_hostile_id_is_ignored(tmp_path):
    (tmp_path / MANIFEST).write_text("".join(json.dumps({"id": i, "count": 1}) + "\n"
                                             for i in ("00001", "../../etc/passwd", "/tmp/x", 7)))
    assert list(load_manifest(tmp_path / MANIFEST)) == ["00001"]
