"""One hostile object among good photos: ingest and preprocess record it with its reason and go
on with the rest. Each kind sits in a folder of synthetic photos made here: metadata nested
100,000 deep (json.loads would raise RecursionError), metadata over the size limit, labels that
are not a plain count, symlinks out of the folder, and FIFOs (a plain read waits for ever)."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from bincounter.config import IngestConfig, PreprocessConfig, SourceConfig
from bincounter.data import validate as v
from bincounter.data.ingest import ERRORS, MANIFEST, ingest, load_manifest
from bincounter.data.preprocess import preprocess
from bincounter.data.shards import merge
from bincounter_demo.synth import SynthConfig, generate
from tests.hostile import NESTED, waited_on_fifos

N_GOOD = 24
OVERSIZED = json.dumps({"EXPECTED_QUANTITY": 1, "pad": "x" * (2**20 + 1)}).encode()


def _good_folder(root: Path) -> Path:
    generate(SynthConfig(n_images=N_GOOD, image_size=32, seed=9), root)
    return root


def _good_ids(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "metadata").glob("0*.json"))


def _add(root: Path, id_: str, metadata: bytes) -> None:
    """A photo of its own (a plain colour from the id), with ``metadata`` as its metadata file."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (int(id_) % 251, int(id_) // 251 % 251, 40)).save(buf, format="JPEG")
    (root / "bin-images" / f"{id_}.jpg").write_bytes(buf.getvalue())
    (root / "metadata" / f"{id_}.json").write_bytes(metadata)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ingest(source: Path, out: Path, **kw):
    return ingest(IngestConfig(source=SourceConfig(uri=str(source)), workers=4, progress=False, **kw), out)


def _preprocess(raw: Path, out: Path, **kw):
    return preprocess(PreprocessConfig(image_size=32, workers=1, **kw), raw, out, progress=False)


def _quarantine(data: Path) -> dict[str, str]:
    return {q["id"]: q["reason"] for q in _lines(data / "quarantine.jsonl")}


def _kept(data: Path) -> set[str]:
    return {r["id"] for r in _lines(data / "index.jsonl")}


# --------------------------------------------------------------------------- nested brackets


def test_ingest_records_metadata_nested_100000_deep_and_copies_every_other_photo(tmp_path):
    source = _good_folder(tmp_path / "source")
    _add(source, "90001", NESTED)
    result = _ingest(source, tmp_path / "raw")

    errors = _lines(tmp_path / "raw" / ERRORS)
    assert [(e["id"], e["reason"]) for e in errors] == [("90001", v.METADATA_TOO_DEEP)]
    assert "nested 100000 deep" in errors[0]["detail"]
    assert (result.downloaded, result.failed) == (N_GOOD, 1)
    assert sorted(load_manifest(tmp_path / "raw" / MANIFEST)) == _good_ids(source)
    assert sum(result.counts.values()) == N_GOOD
    assert not (tmp_path / "raw" / "metadata" / "90001.json").exists()  # not copied


def test_an_ingest_resumes_past_a_manifest_line_nested_too_deep(tmp_path):
    source = _good_folder(tmp_path / "source")
    _ingest(source, tmp_path / "raw")
    with open(tmp_path / "raw" / MANIFEST, "ab") as f:
        f.write(b'{"id": "00001", "x": ' + NESTED + b"}\n")
    result = _ingest(source, tmp_path / "raw")
    assert (result.skipped, result.downloaded, result.failed) == (N_GOOD, 0, 0)


def test_preprocess_quarantines_metadata_nested_too_deep_and_keeps_every_other_photo_on_every_run(tmp_path):
    raw = _good_folder(tmp_path / "raw")
    _add(raw, "90001", NESTED)
    # The input manifest may hold such a line too: it names nothing, the photos are still listed.
    (raw / MANIFEST).write_bytes(b'{"id": ' + NESTED + b"}\n")

    runs = []
    for _ in range(2):
        _preprocess(raw, tmp_path / "data")
        runs.append({name: (tmp_path / "data" / name).read_bytes() for name in ("index.jsonl", "quarantine.jsonl")})
        assert _quarantine(tmp_path / "data") == {"90001": v.METADATA_TOO_DEEP}
        assert _kept(tmp_path / "data") == set(_good_ids(raw))
    assert runs[0] == runs[1]


def test_a_huge_id_in_the_manifest_is_quarantined_shortened_so_that_a_merge_reads_it_back(tmp_path):
    raw = _good_folder(tmp_path / "raw")
    (raw / MANIFEST).write_text(json.dumps({"id": "../" + "x" * 900_000}) + "\n")  # a line within the limit
    cfg = PreprocessConfig(image_size=32, workers=1)
    preprocess(cfg, raw, tmp_path / "part", progress=False)
    merge(cfg, [tmp_path / "part"], tmp_path / "data")
    assert list(_quarantine(tmp_path / "data").values()) == [v.INVALID_ID]
    assert _kept(tmp_path / "data") == set(_good_ids(raw))


# --------------------------------------------------------------------------- size


def test_metadata_over_the_size_limit_is_recorded_by_ingest_and_quarantined_by_preprocess(tmp_path):
    source = _good_folder(tmp_path / "source")
    _add(source, "90002", OVERSIZED)
    _ingest(source, tmp_path / "raw")
    assert [(e["id"], e["reason"]) for e in _lines(tmp_path / "raw" / ERRORS)] == [("90002", v.METADATA_TOO_LARGE)]

    _preprocess(source, tmp_path / "data")
    assert _quarantine(tmp_path / "data") == {"90002": v.METADATA_TOO_LARGE}
    assert _kept(tmp_path / "data") == set(_good_ids(source))


def test_the_size_and_depth_limits_are_settings(tmp_path):
    source = _good_folder(tmp_path / "source")  # metadata of at most 1,077 bytes, 4 deep
    _add(source, "90003", json.dumps({"EXPECTED_QUANTITY": 1, "a": [[[[1]]]], "pad": "x" * 2000}).encode())
    _preprocess(source, tmp_path / "shallow", max_json_depth=4)
    assert _quarantine(tmp_path / "shallow") == {"90003": v.METADATA_TOO_DEEP}
    _preprocess(source, tmp_path / "small", max_metadata_bytes=2000)
    assert _quarantine(tmp_path / "small") == {"90003": v.METADATA_TOO_LARGE}
    _preprocess(source, tmp_path / "default")
    assert _kept(tmp_path / "default") == {*_good_ids(source), "90003"}


# --------------------------------------------------------------------------- ambiguous labels

AMBIGUOUS = {
    "91001": (b'{"EXPECTED_QUANTITY": true}', v.NO_QUANTITY),
    "91002": (b'{"EXPECTED_QUANTITY": 3.0}', v.NO_QUANTITY),
    "91003": (b'{"EXPECTED_QUANTITY": 3.5}', v.NO_QUANTITY),
    "91004": (b'{"EXPECTED_QUANTITY": "3"}', v.NO_QUANTITY),
    "91005": (b'{"EXPECTED_QUANTITY": -1}', v.NO_QUANTITY),
    "91006": (b'{"EXPECTED_QUANTITY": 1000001}', v.NO_QUANTITY),
    "91007": (b'{"EXPECTED_QUANTITY": 10000000000000000000000}', v.NO_QUANTITY),
    "91008": (b'{"BIN_FCSKU_DATA": {}}', v.NO_QUANTITY),
    "91009": (b'{"EXPECTED_QUANTITY": null}', v.NO_QUANTITY),
    "91010": (b'{"EXPECTED_QUANTITY": 2, "EXPECTED_QUANTITY": 3}', v.DUPLICATE_KEY),
    "91011": (b'{"EXPECTED_QUANTITY": 3, "BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": 3}', v.DUPLICATE_KEY),
}


@pytest.mark.parametrize("id_", sorted(AMBIGUOUS))
def test_a_label_that_is_not_a_plain_count_is_quarantined_not_guessed(tmp_path, id_):
    metadata, reason = AMBIGUOUS[id_]
    source = _good_folder(tmp_path / "source")
    _add(source, id_, metadata)
    _ingest(source, tmp_path / "raw")
    assert load_manifest(tmp_path / "raw" / MANIFEST)[id_]["count"] is None  # copied, never counted

    # With a "6+" class every count above 5 has a class: a huge label would otherwise be trained on.
    _preprocess(tmp_path / "raw", tmp_path / "data", overflow="class")
    assert _quarantine(tmp_path / "data") == {id_: reason}
    assert _kept(tmp_path / "data") == set(_good_ids(source))


def test_an_item_quantity_stated_twice_makes_the_count_inconsistent(tmp_path):
    item = b'{"asin": "A", "quantity": 1, "quantity": 2}'
    info = v.check_metadata(b'{"EXPECTED_QUANTITY": 2, "BIN_FCSKU_DATA": {"A": ' + item + b"}}",
                            max_bytes=10_000, max_depth=8)
    assert not info.consistent and info.bad_quantities == ("A",)


# --------------------------------------------------------------------------- a folder's entries


FIFOS = ("outside/pipe", "source/metadata/92004.json", "source/bin-images/92005.jpg")


def _with_escapes(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A good folder plus symlinks out of it (to a photo, to metadata, to a FIFO), a symlink
    that stays inside (fine), and FIFOs; returns it and the reason each bad id gets."""
    source = _good_folder(tmp_path / "source")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(source / "bin-images" / "00002.jpg", outside / "secret.jpg")
    (outside / "secret.json").write_text('{"EXPECTED_QUANTITY": 1}')
    images, metadata = source / "bin-images", source / "metadata"

    (images / "92001.jpg").symlink_to(outside / "secret.jpg")
    shutil.copy(metadata / "00002.json", metadata / "92001.json")
    shutil.copy(images / "00003.jpg", images / "92002.jpg")
    (metadata / "92002.json").symlink_to(Path("..") / ".." / "outside" / "secret.json")  # relative, still out
    shutil.copy(images / "00004.jpg", images / "92003.jpg")
    os.mkfifo(outside / "pipe")
    (metadata / "92003.json").symlink_to(outside / "pipe")
    os.mkfifo(metadata / "92004.json")
    shutil.copy(images / "00005.jpg", images / "92004.jpg")
    os.mkfifo(images / "92005.jpg")
    shutil.copy(metadata / "00005.json", metadata / "92005.json")
    # Inside the folder: read like any file (a duplicate photo, which preprocess finds as such).
    (images / "92006.jpg").symlink_to(images / "00006.jpg")
    shutil.copy(metadata / "00006.json", metadata / "92006.json")
    reasons = {"92001": v.OUTSIDE_FOLDER, "92002": v.OUTSIDE_FOLDER, "92003": v.OUTSIDE_FOLDER,
               "92004": v.NOT_A_FILE, "92005": v.NOT_A_FILE}
    return source, reasons


def test_ingest_reads_nothing_outside_a_folder_source_and_never_waits_on_a_fifo(tmp_path):
    source, reasons = _with_escapes(tmp_path)
    with waited_on_fifos([tmp_path / f for f in FIFOS]) as waited:
        result = _ingest(source, tmp_path / "raw")
    assert not waited, "ingest waited on a FIFO"
    assert {e["id"]: e["reason"] for e in _lines(tmp_path / "raw" / ERRORS)} == reasons
    assert result.failed == len(reasons)
    assert sorted(load_manifest(tmp_path / "raw" / MANIFEST)) == sorted([*_good_ids(source), "92006"])
    copied = {p.name for sub in ("bin-images", "metadata") for p in (tmp_path / "raw" / sub).iterdir()}
    assert not {f"{i}.jpg" for i in reasons} & copied and not {f"{i}.json" for i in reasons} & copied


def test_preprocess_quarantines_what_lies_outside_its_folder_and_never_waits_on_a_fifo(tmp_path):
    source, reasons = _with_escapes(tmp_path)
    with waited_on_fifos([tmp_path / f for f in FIFOS]) as waited:
        _preprocess(source, tmp_path / "data")
    assert not waited, "preprocess waited on a FIFO"
    quarantined = _quarantine(tmp_path / "data")
    assert {i: quarantined[i] for i in reasons} == reasons
    assert quarantined.keys() - reasons.keys() <= {"92006", "00006"}  # one of the two same photos
    assert _kept(tmp_path / "data") == ({*_good_ids(source), "92006"} - quarantined.keys())


def test_a_file_list_nested_too_deep_is_refused_with_a_clear_error(tmp_path):
    source = _good_folder(tmp_path / "source")
    (tmp_path / "file_list.json").write_bytes(b'{"1": ' + NESTED + b"}")
    with pytest.raises(ValueError, match="nested 100001 deep"):
        _ingest(source, tmp_path / "raw", file_list=str(tmp_path / "file_list.json"))
