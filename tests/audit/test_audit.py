"""The pod audit: planted mismatches found, nothing else flagged, resumable, CSV = Parquet."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fastapi import FastAPI, Request  # module level: the test app's annotations resolve here

from bincounter.audit.pod import COLUMNS, CSV_FILE, ERRORS_FILE, JOURNAL, PARQUET_FILE, REPORT_FILE, AuditError, audit
from bincounter.config import AuditConfig, SourceConfig, VerdictConfig
from bincounter_demo.synth import SynthConfig
from tests.fake_counter import register_fake
from tests.hostile import NESTED, waited_on_fifos
from tests.live_server import serving

ROOT = Path(__file__).resolve().parents[2]
N_PHOTOS = 40
PLANTED = ("00003", "00011", "00017", "00026", "00038")
# The fake counter is certain (one-hot): a flag threshold of 0.05 flags exactly the bins
# whose expected count it gives probability 0.
CERTAIN = VerdictConfig(flag_threshold=0.05, match_threshold=0.5)
# Held-out reliability of the registered model: counts given with confidence ~1 were right 90% of the time.
RELIABILITY = {"edges": [i / 10 for i in range(11)], "accuracy": [None] * 9 + [0.9],
               "confidence": [None] * 9 + [0.99], "counts": [0] * 9 + [100]}


def _plant(folder: Path, ids) -> dict[str, int]:
    """Change the expected count of ``ids`` in their metadata; returns the true counts."""
    truth = {}
    for id_ in ids:
        path = folder / "metadata" / f"{id_}.json"
        meta = json.loads(path.read_text())
        truth[id_] = meta["EXPECTED_QUANTITY"]
        meta["EXPECTED_QUANTITY"] = (truth[id_] + 2) % 6
        path.write_text(json.dumps(meta))
    return truth


@pytest.fixture
def pod(tmp_path) -> Path:
    """40 synthetic bins, the fake counter registered as champion (with its evaluation), and
    five bins whose metadata now expects a wrong count."""
    from bincounter_demo.synth import generate

    folder = tmp_path / "pod"
    generate(SynthConfig(n_images=N_PHOTOS, image_size=48, seed=5), folder)
    register_fake(folder, tmp_path, reliability=RELIABILITY)
    _plant(folder, PLANTED)
    return folder


def _cfg(source: str, **kw) -> AuditConfig:
    return AuditConfig(**{"source": SourceConfig(uri=source), "verdict": CERTAIN, "progress": False, "workers": 4,
                          "batch_size": 4, **kw})


def _read_csv(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / CSV_FILE, dtype={"id": str})


def test_audit_finds_every_planted_mismatch_and_flags_no_other_bin(pod, tmp_path):
    from mlflow import MlflowClient

    from bincounter import launch

    out = tmp_path / "out"
    summary = launch.audit(_cfg(str(pod)), str(out))
    table = _read_csv(out)
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == N_PHOTOS and table["id"].is_unique
    assert set(table.loc[table.verdict == "mismatch", "id"]) == set(PLANTED)
    assert set(table.loc[table.verdict == "match", "id"]) == set(table["id"]) - set(PLANTED)
    assert summary["mismatches"] == len(PLANTED) and summary["unsure"] == 0 and summary["errors"] == 0
    assert (table.loc[table.verdict == "mismatch", "probability_of_expected"] == 0).all()
    # Expected precision from the model version's held-out reliability (90% right at this confidence).
    assert summary["expected_flag_precision"] == pytest.approx(0.9)
    assert summary["counter"] == "models:/bincounter/1" and "evaluation/metrics.json" in summary["calibration"]

    report = (out / REPORT_FILE).read_text()
    assert "at least 90.0%" in report
    flagged = report.split("<h2>Flagged bins")[1].split("<h2>Unsure")[0]
    assert flagged.count("data:image/jpeg;base64,") == len(PLANTED)
    assert all(f"<td>{id_}</td>" in flagged for id_ in PLANTED)

    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("bincounter-audit").experiment_id])
    assert runs[0].data.metrics["mismatches"] == len(PLANTED) and runs[0].data.metrics["checked"] == N_PHOTOS
    artifacts = {a.path for a in MlflowClient().list_artifacts(runs[0].info.run_id, "audit")}
    assert {"audit/report.html", "audit/audit.parquet"} <= artifacts


def test_csv_and_parquet_agree(pod, tmp_path, capsys):
    from bincounter.cli import main

    out = tmp_path / "out"
    main(["audit", str(pod), "--out", str(out), "--no-progress", "--workers", "2", "--no-track",
          "--verdict.flag-threshold", "0.05"])
    assert json.loads(capsys.readouterr().out)["mismatches"] == len(PLANTED)
    from_csv = _read_csv(out)
    from_parquet = pd.read_parquet(out / PARQUET_FILE)
    assert list(from_parquet.columns) == list(COLUMNS)
    pd.testing.assert_frame_equal(from_csv, from_parquet, check_dtype=False)


def test_expected_counts_from_a_csv_with_hostile_rows(pod, tmp_path):
    (pod / "bin-images" / "00005.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    csv_path = tmp_path / "expected.csv"
    csv_path.write_text("id,expected\n"
                        "00001,{}\n"  # right (filled in below)
                        "00002,5\n00002,4\n"  # listed twice, two answers
                        "../../etc/passwd,1\n"
                        "00004,many\n"
                        "00006,5000\n"
                        "00005,2\n"  # undecodable photo
                        "99999,1\n"  # no such photo
                        "\n")
    truth = json.loads((pod / "metadata" / "00001.json").read_text())["EXPECTED_QUANTITY"]
    csv_path.write_text(csv_path.read_text().format(truth))
    out = tmp_path / "out"
    summary = audit(_cfg(str(pod), expected_csv=str(csv_path)), out)
    table = _read_csv(out)
    assert set(table["id"]) == {"00001", "00002"}
    assert table.set_index("id").loc["00001", "verdict"] == "match"
    errors = pd.read_csv(out / ERRORS_FILE, dtype=str).set_index("id")["reason"]
    assert "invalid id '../../etc/passwd'" in errors["csv line 5"]
    assert "invalid literal" in errors["csv line 6"] and "outside 0..1000" in errors["csv line 7"]
    assert "listed again" in errors["00002"]
    assert "could not count" in errors["00005"] and "does not exist" in errors["99999"]
    assert summary.errors == 6 and summary.checked == 2
    assert not (tmp_path.parent / "etc").exists()


def test_a_hostile_bin_is_an_error_and_the_audit_counts_every_other(pod, tmp_path):
    """Metadata nested 100,000 deep, a label stated twice, a photo linked from outside the
    folder and a FIFO for metadata: each is its bin's error, never a crash or a wait."""
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((pod / "bin-images" / "00009.jpg").read_bytes())
    (pod / "metadata" / "00007.json").write_bytes(NESTED)
    (pod / "metadata" / "00008.json").write_bytes(b'{"EXPECTED_QUANTITY": 1, "EXPECTED_QUANTITY": 2}')
    (pod / "bin-images" / "00009.jpg").unlink()
    (pod / "bin-images" / "00009.jpg").symlink_to(outside)
    (pod / "metadata" / "00010.json").unlink()
    os.mkfifo(pod / "metadata" / "00010.json")
    out = tmp_path / "out"
    with waited_on_fifos([pod / "metadata" / "00010.json"]) as waited:
        summary = audit(_cfg(str(pod)), out)
    assert not waited, "the audit waited on a FIFO"
    errors = pd.read_csv(out / ERRORS_FILE, dtype=str).set_index("id")["reason"]
    assert "metadata_too_deep" in errors["00007"] and "duplicate_expected_quantity" in errors["00008"]
    assert "outside" in errors["00009"] and "not a regular file" in errors["00010"]
    assert summary.errors == 4 and summary.checked == N_PHOTOS - 4
    assert set(_read_csv(out)["id"]) == {f"{i:05d}" for i in range(1, N_PHOTOS + 1)} - set(errors.index)


def test_a_csv_line_too_long_or_a_quote_left_open_is_an_error_and_the_audit_goes_on(pod, tmp_path):
    truth = {i: json.loads((pod / "metadata" / f"{i}.json").read_text())["EXPECTED_QUANTITY"] for i in ("00001", "00006")}
    csv_path = tmp_path / "expected.csv"
    csv_path.write_text("id,expected\n"
                        f"00001,{truth['00001']}\n"
                        f"00002,{'9' * 70_000}\n"  # over max_csv_line_bytes (64 KiB): never held whole
                        f'00004,"{"x" * 60_000}\n' + ("x" * 60_000 + "\n") * 2 +  # csv's field limit (128 KiB)
                        f"00006,{truth['00006']}\n")
    out = tmp_path / "out"
    summary = audit(_cfg(str(pod), expected_csv=str(csv_path)), out)
    assert set(_read_csv(out)["id"]) == {"00001", "00006"}
    errors = pd.read_csv(out / ERRORS_FILE, dtype=str).set_index("id")["reason"]
    assert "longer than 65536 bytes" in errors["csv line 3"]
    assert any("field larger than field limit" in reason for reason in errors)
    assert summary.checked == 2


def test_a_csv_without_the_columns_is_refused(pod, tmp_path):
    bad = tmp_path / "expected.csv"
    bad.write_text("bin,count\n00001,1\n")
    with pytest.raises(AuditError, match="'id' and 'expected'"):
        audit(_cfg(str(pod), expected_csv=str(bad)), tmp_path / "out")


def test_audit_over_s3_at_any_endpoint(pod, tmp_path):
    from bincounter_demo.s3server import LocalS3

    with LocalS3() as s3:
        s3.upload_folder(pod, "pods", prefix="site-7/pod-3")
        cfg = _cfg("s3://pods/site-7/pod-3").model_copy(update={"source": SourceConfig(
            uri="s3://pods/site-7/pod-3", endpoint_url=s3.endpoint)})
        summary = audit(cfg, tmp_path / "out")
        # The expected counts may come from a CSV in the bucket too.
        s3.client().put_object(Bucket="pods", Key="site-7/expected.csv", Body=b"id,expected\n00003,1\n00004,9\n")
        truth = json.loads((pod / "metadata" / "00004.json").read_text())["EXPECTED_QUANTITY"]
        by_csv = audit(cfg.model_copy(update={"expected_csv": "s3://pods/site-7/expected.csv"}), tmp_path / "csv")
    table = _read_csv(tmp_path / "out")
    assert summary.checked == N_PHOTOS and set(table.loc[table.verdict == "mismatch", "id"]) == set(PLANTED)
    assert by_csv.checked == 2 and _read_csv(tmp_path / "csv").set_index("id").loc["00004", "predicted"] == truth


def test_an_unreachable_source_is_a_clear_error(tmp_path, pod):
    from bincounter_demo.s3server import free_port

    cfg = _cfg("s3://pods").model_copy(update={"source": SourceConfig(
        uri="s3://pods", endpoint_url=f"http://127.0.0.1:{free_port()}"), "retries": 0})
    with pytest.raises(AuditError, match="cannot list s3://pods/"):
        audit(cfg, tmp_path / "out")


def test_audit_through_a_deployed_servers_batch_endpoint(pod, tmp_path):
    import mlflow.pyfunc

    from bincounter.serving import app as serve
    from bincounter.config import ServeConfig

    model = mlflow.pyfunc.load_model("models:/bincounter@champion")
    with serving(serve.create_app(ServeConfig(model_uri="models:/bincounter@champion"), model=model)) as url:
        summary = audit(_cfg(str(pod), url=url), tmp_path / "out")
    table = _read_csv(tmp_path / "out")
    assert summary.counter == url
    assert set(table.loc[table.verdict == "mismatch", "id"]) == set(PLANTED) and summary.unsure == 0
    # The server says which model it serves: the calibration comes from that model's run.
    assert summary.expected_flag_precision == pytest.approx(0.9)


def test_an_unreachable_server_stops_the_audit_with_a_clear_error(pod, tmp_path):
    from bincounter_demo.s3server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(AuditError, match=f"cannot reach the bincounter server at {url}"):
        audit(_cfg(str(pod), url=url), tmp_path / "out")


def test_calibration_unavailable_is_said_plainly(tmp_path):
    from bincounter_demo.synth import generate

    folder = tmp_path / "pod"
    generate(SynthConfig(n_images=8, image_size=48, seed=2), folder)
    register_fake(folder, tmp_path)  # no evaluation logged with this model
    _plant(folder, ["00002"])
    summary = audit(_cfg(str(folder)), tmp_path / "out")
    assert summary.mismatches == 1 and summary.expected_flag_precision is None
    assert summary.calibration.startswith("unavailable")
    assert "<b>unavailable</b>" in (tmp_path / "out" / REPORT_FILE).read_text()


def test_other_thresholds_on_a_finished_audit_recount_nothing(pod, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("FAKE_COUNTER_CALLS", str(calls))
    audit(_cfg(str(pod)), out)
    first = calls.read_text()
    # Nothing is below 0.0: with flag threshold 0 the planted bins (p = 0) are still flagged,
    # and a match threshold above 1 is refused by the config, so use the widest valid band.
    summary = audit(_cfg(str(pod), verdict=VerdictConfig(flag_threshold=0.0, match_threshold=1.0)), out)
    assert calls.read_text() == first  # the journal answered: no photo counted again
    assert summary.counted_now == 0 and summary.mismatches == len(PLANTED)


def test_a_folder_holding_another_models_audit_is_refused(pod, tmp_path):
    out = tmp_path / "out"
    audit(_cfg(str(pod)), out)
    register_fake(pod, tmp_path)  # a new champion: version 2
    with pytest.raises(AuditError, match="counter='models:/bincounter/1'"):
        audit(_cfg(str(pod)), out)


_KILLABLE = """
import sys
from bincounter.audit.pod import audit
from bincounter.config import AuditConfig
audit(AuditConfig.model_validate_json(sys.argv[1]), sys.argv[2])
"""


@pytest.mark.slow
def test_a_killed_audit_resumes_without_recounting(pod, tmp_path, isolated_home):
    out = tmp_path / "out"
    calls = tmp_path / "calls.txt"
    cfg = _cfg(str(pod))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
           "FAKE_COUNTER_CALLS": str(calls), "FAKE_COUNTER_KILL_AFTER": "3"}
    killed = subprocess.run([sys.executable, "-c", _KILLABLE, cfg.model_dump_json(), str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    import sqlite3

    with contextlib.closing(sqlite3.connect(out / JOURNAL)) as db:
        journaled = db.execute("SELECT COUNT(*) FROM bins").fetchone()[0]
    counted_before = sum(int(n) for n in calls.read_text().split())
    assert journaled == counted_before == 3 * cfg.batch_size  # every counted batch was on disk

    del env["FAKE_COUNTER_KILL_AFTER"]
    rerun = subprocess.run([sys.executable, "-c", _KILLABLE, cfg.model_dump_json(), str(out)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    counted = [int(n) for n in calls.read_text().split()]
    assert sum(counted) == N_PHOTOS  # each photo counted once over both runs
    table = _read_csv(out)
    assert len(table) == N_PHOTOS and table["id"].is_unique
    assert set(table.loc[table.verdict == "mismatch", "id"]) == set(PLANTED)
    assert json.loads((out / "summary.json").read_text())["counted_now"] == N_PHOTOS - journaled


def test_a_model_that_cannot_be_loaded_is_named(tmp_path):
    from bincounter_demo.synth import generate

    generate(SynthConfig(n_images=2, image_size=48, seed=1), tmp_path / "pod")
    with pytest.raises(AuditError, match="cannot load the model models:/nobody@champion"):
        audit(_cfg(str(tmp_path / "pod"), model_uri="models:/nobody@champion"), tmp_path / "out")


def test_the_batch_client_waits_out_a_busy_server_and_refuses_a_foreign_one(pod, tmp_path):
    from fastapi.responses import JSONResponse

    from bincounter.serving.client import count_batch

    app = FastAPI()
    seen = []

    @app.post("/v1/count:batch")
    async def batch(request: Request):
        form = await request.form()
        seen.append(len(form.getlist("files")))
        if len(seen) == 1:
            return JSONResponse({"detail": "queue full"}, status_code=503, headers={"Retry-After": "0"})
        return [{"count": 1, "confidence": 0.9, "probabilities": [0.1, 0.9]}] * len(form.getlist("files"))

    @app.post("/other/v1/count:batch")
    async def foreign(request: Request):
        return [{"label": "cat"}] * len((await request.form()).getlist("files"))

    @app.get("/other/readyz")
    async def foreign_ready():
        return {"status": "ready", "model_uri": "cat-detector"}

    with serving(app) as url:
        answers = count_batch(url, [("a.jpg", b"x"), ("b.jpg", b"y")])
        assert seen == [2, 2] and [a["count"] for a in answers] == [1, 1]
        with pytest.raises(AuditError, match="not a count with probabilities"):
            audit(_cfg(str(pod), url=url + "/other"), tmp_path / "out")
        with pytest.raises(AuditError, match="not ready \\(404\\)"):  # no /readyz: no model to pin the audit to
            audit(_cfg(str(pod), url=url), tmp_path / "out2")


def test_a_rerun_through_a_redeployed_server_is_refused_not_merged(pod, tmp_path):
    """The audit pins the model the server serves (its /readyz): after a redeploy to another
    version, resuming the same folder would mix two models' counts."""
    import mlflow.pyfunc

    from bincounter.config import ServeConfig
    from bincounter.serving import app as serve

    from bincounter_demo.s3server import free_port

    out, port = tmp_path / "out", free_port()
    model = mlflow.pyfunc.load_model("models:/bincounter@champion")
    with serving(serve.create_app(ServeConfig(model_uri="models:/bincounter@champion"), model=model), port) as url:
        audit(_cfg(str(pod), url=url), out)
    register_fake(pod, tmp_path)  # the champion is version 2 now; the same URL serves it after a redeploy
    with serving(serve.create_app(ServeConfig(model_uri="models:/bincounter@champion"), model=model), port) as url:
        with pytest.raises(AuditError, match="served_model='models:/bincounter@champion v1'"):
            audit(_cfg(str(pod), url=url), out)


def test_a_redeploy_during_the_audit_stops_it_with_the_reason(pod, tmp_path):
    import mlflow.pyfunc

    from bincounter.config import ServeConfig
    from bincounter.serving import app as serve

    model = mlflow.pyfunc.load_model("models:/bincounter@champion")
    app = serve.create_app(ServeConfig(model_uri="models:/bincounter@champion"), model=model)
    original = model.predict

    def predict_then_redeploy(frame):  # the second batch is answered by "another version"
        app.state.model_state.version = "9"
        return original(frame)

    model.predict = predict_then_redeploy
    with serving(app) as url:
        with pytest.raises(AuditError, match="now serves models:/bincounter@champion v9, not .* v1"):
            audit(_cfg(str(pod), url=url, batch_size=2), tmp_path / "out")


def test_a_pooled_last_class_is_judged_the_same_through_a_server_and_in_process():
    """A bin expected to hold 8 against a model whose last class is "6+": its probability is that
    class's, whichever way the answer came (the server's answers carry the class names)."""
    from bincounter.audit.pod import _Photo, _row

    probs = [0.05, 0.05, 0.6, 0.1, 0.1, 0.05, 0.05]
    labels = ["0", "1", "2", "3", "4", "5", "6+"]
    server = {"count": 2, "confidence": 0.6, "probabilities": probs, "label": "2", "labels": labels}
    in_process = {"count": 2, "confidence": 0.6, "probabilities": probs, "label": "2", "labels": labels}
    photo = _Photo("00001", 8, b"")
    cfg = AuditConfig(source=SourceConfig(uri="/unused"))
    rows = [_row(photo, answer, cfg, {}) for answer in (server, in_process)]
    assert rows[0]["probability_of_expected"] == rows[1]["probability_of_expected"] == 0.05
    assert rows[0]["open_ended"] == rows[1]["open_ended"] == 1  # journaled: the outputs judge it the same way
    # Before: only a predicted "6+" told the audit the last class was open-ended.
    assert _row(photo, {**server, "labels": None}, cfg, {})["probability_of_expected"] is None


VERDICTS = {"error_rate": 0.05, "off_by_one_share": 0.8, "off_by_more_share": 0.05,
            "chosen": {"posterior": {"flag_threshold": 0.2, "match_threshold": 0.9},
                       "thresholds": {"flag_threshold": 0.05, "match_threshold": 0.5}},
            "figures": [{"rule": "posterior", "error_rate": 0.01, "flag_precision": 0.9, "flag_recall": 0.5,
                         "wrong_passed": 0.02, "settled": 0.8, "false_flags": 0.001},
                        {"rule": "posterior", "error_rate": 0.1, "flag_precision": 0.99, "flag_recall": 0.6,
                         "wrong_passed": 0.04, "settled": 0.7, "false_flags": 0.002}]}


def test_the_thresholds_and_figures_evaluation_chose_come_with_the_model(tmp_path):
    from bincounter_demo.synth import generate

    folder = tmp_path / "pod"
    generate(SynthConfig(n_images=12, image_size=48, seed=3), folder)
    register_fake(folder, tmp_path, reliability=RELIABILITY, verdicts=VERDICTS)
    _plant(folder, ["00004"])
    summary = audit(_cfg(str(folder), verdict=VerdictConfig()), tmp_path / "out")
    assert summary.mismatches == 1 and summary.matches == 11  # the fake counter is certain either way
    assert (summary.rule, summary.error_rate) == ("posterior", 0.05)
    assert (summary.flag_threshold, summary.match_threshold) == (0.2, 0.9)
    assert summary.thresholds_from == "the model's evaluation" and "evaluation/verdict.json" in summary.evaluation
    # Read off the held-out figures at the audit's error rate (between the stored 1% and 10%).
    assert summary.evaluated_flag_precision == pytest.approx(0.9 + (0.05 - 0.01) / 0.09 * 0.09)
    assert summary.evaluated_wrong_passed == pytest.approx(0.02 + (0.05 - 0.01) / 0.09 * 0.02)
    report = (tmp_path / "out" / REPORT_FILE).read_text()
    assert "inventory error rate of 5.0%" in report and "Thresholds from the model's evaluation" in report
    assert "these settings flagged with a precision of <b>94.0%</b>" in report
    table = _read_csv(tmp_path / "out")
    assert table.set_index("id").loc["00004", "probability_record_right"] == 0.0

    # Thresholds of the audit's own: the held-out figures no longer describe them, and it says so.
    own = audit(_cfg(str(folder), verdict=VerdictConfig(flag_threshold=0.01, match_threshold=0.99)),
                tmp_path / "out")
    assert own.thresholds_from == "the audit's settings" and own.evaluated_flag_precision is None
    assert own.evaluation.startswith("unavailable")


def test_a_verdict_file_that_fails_its_checks_is_not_used(tmp_path):
    from bincounter_demo.synth import generate

    folder = tmp_path / "pod"
    generate(SynthConfig(n_images=6, image_size=48, seed=4), folder)
    hostile = {**VERDICTS, "chosen": {"posterior": {"flag_threshold": 0.9, "match_threshold": 0.2}}}
    register_fake(folder, tmp_path, verdicts=hostile)
    summary = audit(_cfg(str(folder), verdict=VerdictConfig()), tmp_path / "out")
    assert summary.thresholds_from == "the rule's defaults" and (summary.flag_threshold, summary.match_threshold) == \
        (0.05, 0.95)
    assert "flag below match" in summary.evaluation


def test_a_journal_from_before_pooled_classes_were_journaled_still_resumes(tmp_path):
    import sqlite3

    from bincounter.audit.pod import Journal

    path = tmp_path / JOURNAL
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE bins (id TEXT PRIMARY KEY, expected INTEGER NOT NULL, predicted INTEGER NOT NULL,
            confidence REAL NOT NULL, probability_of_expected REAL, probabilities TEXT NOT NULL,
            first_count INTEGER NOT NULL, thumbnail BLOB);
        INSERT INTO bins VALUES ('00001', 2, 2, 0.9, 0.9, '[0.05, 0.05, 0.9]', 0, NULL);
    """)
    db.commit()
    db.close()
    journal = Journal(path)
    assert list(journal.rows()) == [("00001", 2, 2, 0.9, 0.9, "[0.05, 0.05, 0.9]", 0, 0)]
    journal.close()
