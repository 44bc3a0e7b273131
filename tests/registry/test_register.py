import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from bincounter.config import RegisterConfig
from bincounter.registry.register import decide, register

pytestmark = pytest.mark.slow


def images(synth_dir, n=2):
    return [(synth_dir / "bin-images" / f"{i:05d}.jpg").read_bytes() for i in range(1, n + 1)]


@pytest.mark.parametrize(
    "new, current, margin, promoted",
    [(0.5, None, 0.0, True), (0.6, 0.5, 0.0, True), (0.5, 0.5, 0.0, False), (0.52, 0.5, 0.05, False),
     (0.4, 0.5, 0.0, False)],
)
def test_promotion_rule(new, current, margin, promoted):
    assert decide(new, current, RegisterConfig(min_improvement=margin))[0] is promoted


def test_lower_is_better_metrics():
    cfg = RegisterConfig(metric="rmse", greater_is_better=False)
    assert decide(0.9, 1.0, cfg)[0] and not decide(1.1, 1.0, cfg)[0]


def test_gate_promotes_better_and_keeps_champion_against_worse(model_dir, synth_dir):
    from mlflow import MlflowClient

    cfg = RegisterConfig(model_name="gate-test")
    first = register(cfg, model_dir, {"accuracy": 0.5, "rmse": 1.0}, example_images=images(synth_dir))
    better = register(cfg, model_dir, {"accuracy": 0.6, "rmse": 0.9}, example_images=images(synth_dir))
    worse = register(cfg, model_dir, {"accuracy": 0.55, "rmse": 0.95}, example_images=images(synth_dir))
    assert first.promoted and better.promoted and not worse.promoted
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("gate-test", "champion").version) == better.version
    assert str(client.get_model_version_by_alias("gate-test", "challenger").version) == worse.version
    version = client.get_model_version("gate-test", worse.version)
    assert version.tags["promotion.decision"] == "kept"
    assert "does not beat" in version.tags["promotion.reason"]
    assert version.tags["lineage.git_commit"]
    assert "## Held-out metrics" in version.description  # the model card


def test_racing_registrations_leave_a_consistent_registry(model_dir, synth_dir):
    from mlflow import MlflowClient

    cfg = RegisterConfig(model_name="race-test")
    scores = [0.3, 0.7, 0.5, 0.6]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda a: register(cfg, model_dir, {"accuracy": a}, example_images=images(synth_dir)),
                                scores))
    client = MlflowClient()
    versions = client.search_model_versions("name='race-test'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    champion = client.get_model_version_by_alias("race-test", "champion")
    assert float(champion.tags["metric.accuracy"]) == 0.7  # the best one wins whatever the order
    assert len({r.version for r in results}) == 4


def test_pyfunc_loads_by_alias_in_a_fresh_process_and_counts_raw_bytes(model_dir, synth_dir, isolated_home):
    cfg = RegisterConfig(model_name="pyfunc-test")
    register(cfg, model_dir, {"accuracy": 0.5}, example_images=images(synth_dir))
    script = f"""
import json, mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/pyfunc-test@champion")
imgs = [open(r"{synth_dir}/bin-images/{{:05d}}.jpg".format(i), "rb").read() for i in (1, 2, 3)]
out = model.predict(pd.DataFrame({{"image": imgs}}))
print(json.dumps({{"counts": out["count"].tolist(), "p": out["probabilities"].tolist(),
                   "meta": model.metadata.metadata}}))
"""
    # A fresh interpreter outside the repo: only the logged model's own code is importable there.
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=isolated_home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["counts"]) == 3 and all(0 <= c <= 5 for c in out["counts"])
    assert all(abs(sum(p) - 1) < 1e-4 for p in out["p"])
    assert out["meta"]["class_names"] == ["0", "1", "2", "3", "4", "5"]


def test_registration_leaves_no_temporary_copy_of_the_model(model_dir, synth_dir, tmp_path, monkeypatch):
    """Each registration stages the serving files in a temporary folder; it must be gone afterwards
    (a leaked copy of the weights per call fills a long-lived worker's disk)."""
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    register(RegisterConfig(model_name="temp-test"), model_dir, {"accuracy": 0.5}, example_images=images(synth_dir))
    register(RegisterConfig(model_name="temp-test"), model_dir, {"accuracy": 0.6}, example_images=images(synth_dir))
    assert not list(scratch.glob("bincounter-serving-*"))
    assert not list(scratch.rglob("model.pt")), "a copy of the weights was left in the temporary folder"
