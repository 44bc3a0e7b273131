"""Promotion between pods: processes that share nothing but a real ``mlflow server`` on loopback."""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from bincounter.config import RegisterConfig
from bincounter.registry.register import CHAMPION, PromotionError, Verdict, promote
from tests.judges import always, by_recorded_score

pytestmark = pytest.mark.slow
NAME = "race"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server (SQLite behind it), as every pod of a cluster would share."""
    tmp_path = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("w"))
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _register_and_promote(uri: str, scores: list[float], start, results, name: str = NAME) -> None:
    """One 'pod': registers a version per score and gates each, as the register step does."""
    from mlflow import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    cfg = RegisterConfig(model_name=name, tracking_uri=uri)
    start.wait()
    for score in scores:
        version = client.create_model_version(name, source=f"s3://models/{score}",
                                              tags={"metric.accuracy": str(score)}).version
        verdict = promote(client, cfg, str(version), by_recorded_score(client, name, score))
        results.put((str(version), score, verdict.promote))


def test_two_processes_promoting_at_once_end_with_the_best_and_true_decisions(mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    client.create_registered_model(NAME)
    # Interleaved scores, rising and falling in both processes, all distinct.
    a = [0.50, 0.71, 0.55, 0.90, 0.62, 0.58]
    b = [0.60, 0.52, 0.80, 0.57, 0.93, 0.65]
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_register_and_promote, args=(mlflow_server, s, start, results)) for s in (a, b)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    outcomes = [results.get(timeout=5) for _ in a + b]

    score = {v: s for v, s, _ in outcomes}
    champion = client.get_model_version_by_alias(NAME, CHAMPION)
    assert score[champion.version] == max(a + b) == 0.93
    # Every decision was true when made: a promoted version beat the champion it replaced, a kept
    # one did not; and the promotions form one chain (no two replaced the same champion).
    replaced = []
    for version, s, promoted in outcomes:
        tags = client.get_model_version(NAME, version).tags
        before = tags["promotion.champion_before"]
        assert tags["promotion.decision"] == ("promoted" if promoted else "kept")
        if promoted:
            assert before == "none" or score[before] < s
            replaced.append(before)
        else:
            assert score[before] > s
    assert len(replaced) == len(set(replaced)), replaced
    assert replaced.count("none") == 1
    # The lock is gone.
    assert not client.search_registered_models(f"name = '{NAME}.promotion-lock'")


def test_a_judge_that_cannot_decide_promotes_nothing(mlflow_server):
    from mlflow import MlflowClient

    NAME = "undecided"  # noqa: N806 - one registry for the module's tests
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    client.create_registered_model(NAME)
    first = client.create_model_version(NAME, source="s3://models/x").version
    cfg = RegisterConfig(model_name=NAME, tracking_uri=mlflow_server)
    assert promote(client, cfg, str(first), always()).promote
    other = client.create_model_version(NAME, source="s3://models/y").version

    def broken(champion):
        raise PromotionError(f"champion v{champion} cannot be scored")

    with pytest.raises(PromotionError, match="champion v1"):
        promote(client, cfg, str(other), broken)
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == first


def test_evidence_about_a_champion_that_changed_meanwhile_is_not_used(mlflow_server):
    """The judge runs outside the lock: if another pod promoted meanwhile, the verdict is about a
    champion that no longer is, so the challenger is judged again against the new one."""
    from mlflow import MlflowClient

    NAME = "moving-champion"  # noqa: N806
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    client.create_registered_model(NAME)
    v1, v2, v3 = (client.create_model_version(NAME, source=f"s3://models/{i}").version for i in range(3))
    cfg = RegisterConfig(model_name=NAME, tracking_uri=mlflow_server)
    promote(client, cfg, str(v1), always())
    judged = []

    def judge(champion):
        judged.append(champion)
        if len(judged) == 1:  # another pod promotes v2 while v3 is being judged against v1
            client.set_registered_model_alias(NAME, CHAMPION, v2)
        return Verdict(champion == str(v2), f"against v{champion}")

    verdict = promote(client, cfg, str(v3), judge)
    assert judged == [str(v1), str(v2)] and verdict.promote
    assert client.get_model_version(NAME, v3).tags["promotion.champion_before"] == str(v2)


def test_a_stale_lock_of_a_killed_process_is_broken(mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    NAME = "stale-lock"  # noqa: N806
    from bincounter.registry import register as reg

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    client.create_registered_model(NAME)
    client.create_registered_model(NAME + reg.LOCK_SUFFIX)  # left behind by a killed pod
    monkeypatch.setattr(reg, "LOCK_STALE_S", 0.0)
    version = client.create_model_version(NAME, source="s3://models/x", tags={"metric.accuracy": "0.5"}).version
    assert promote(client, RegisterConfig(model_name=NAME), str(version), always()).promote
    monkeypatch.setattr(reg, "LOCK_STALE_S", 600.0)
    client.create_registered_model(NAME + reg.LOCK_SUFFIX)  # a live holder
    with pytest.raises(TimeoutError):
        with reg.registry_lock(client, NAME, timeout=1.0):
            pass
