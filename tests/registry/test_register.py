import csv
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from bincounter.config import RegisterConfig
from bincounter.registry.register import register
from tests.judges import always, by_recorded_score

pytestmark = pytest.mark.slow


def images(synth_dir, n=2):
    return [(synth_dir / "bin-images" / f"{i:05d}.jpg").read_bytes() for i in range(1, n + 1)]


def test_racing_registrations_leave_a_consistent_registry(model_dir, synth_dir):
    from mlflow import MlflowClient

    cfg = RegisterConfig(model_name="race-test")
    scores = [0.3, 0.7, 0.5, 0.6]
    client = MlflowClient()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda a: register(cfg, model_dir, {"accuracy": a}, example_images=images(synth_dir),
                                                   judge=by_recorded_score(client, "race-test", a)), scores))
    versions = client.search_model_versions("name='race-test'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    champion = client.get_model_version_by_alias("race-test", "champion")
    assert float(champion.tags["metric.accuracy"]) == 0.7  # the best one wins whatever the order
    assert len({r.version for r in results}) == 4


def test_pyfunc_loads_by_alias_in_a_fresh_process_and_counts_raw_bytes(model_dir, synth_dir, isolated_home):
    cfg = RegisterConfig(model_name="pyfunc-test")
    register(cfg, model_dir, {"accuracy": 0.5}, example_images=images(synth_dir), judge=always())
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
    for accuracy in (0.5, 0.6):
        register(RegisterConfig(model_name="temp-test"), model_dir, {"accuracy": accuracy},
                 example_images=images(synth_dir), judge=always())
    assert not list(scratch.glob("bincounter-serving-*"))
    assert not list(scratch.rglob("model.pt")), "a copy of the weights was left in the temporary folder"


def test_the_gate_scores_the_champion_on_the_challengers_photos(model_dir, data_dir, tmp_path):
    """Through the register stage: the champion is evaluated again on the challenger's test photos,
    a trained model replaces an untrained one (a real gain), and the untrained one does not come
    back; each decision carries both models' figures on the same photos."""
    import torch
    from mlflow import MlflowClient

    from bincounter import launch
    from bincounter.config import EvaluateConfig
    from bincounter.model.networks import ModelSpec, build_model

    torch.manual_seed(0)
    spec = ModelSpec(backbone="tiny_cnn", num_classes=6, image_size=64, class_names=tuple("012345"))
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    torch.save({"model": build_model(spec, pretrained="none").state_dict(), "spec": spec.to_dict(), "epoch": 0},
               untrained / "model.pt")
    (untrained / "model_spec.json").write_text(json.dumps(spec.to_dict()))
    scored = {}
    for name, folder in (("untrained", untrained), ("trained", model_dir)):
        scored[name] = launch.evaluate(EvaluateConfig(latency_samples=0), str(folder), str(data_dir),
                                       str(tmp_path / f"eval-{name}"))["summary"]["accuracy"]
    cfg = RegisterConfig(model_name="gate-test")

    def register_(name, folder):
        out = tmp_path / f"registration-{len(list(tmp_path.glob('registration-*')))}"
        return launch.register(cfg, str(folder), str(tmp_path / f"eval-{name}"), str(data_dir), out_dir=str(out))

    first = register_("untrained", untrained)
    second = register_("trained", model_dir)
    third = register_("untrained", untrained)
    assert first["promoted"] and second["promoted"] and not third["promoted"]
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("gate-test", "champion").version) == second["version"]
    tags = client.get_model_version("gate-test", second["version"]).tags
    assert tags["gate.champion_version"] == first["version"] and float(tags["gate.p_value"]) < 0.05
    # The champion was scored again, on these photos, exactly as its own evaluation scored it.
    assert float(tags["gate.champion.accuracy"]) == pytest.approx(scored["untrained"], abs=1e-6)
    assert float(tags["gate.challenger.accuracy"]) == pytest.approx(scored["trained"], abs=1e-6)
    kept = client.get_model_version("gate-test", third["version"])
    assert kept.tags["promotion.decision"] == "kept" and kept.tags["gate.champion_version"] == second["version"]
    assert kept.tags["gate.photos_sha256"] == tags["gate.photos_sha256"]  # the same photos each time
    assert "gate.p_value" in kept.description and "## Promotion" in kept.description  # the model card
    # The deploy step's smoke photos: how the version that serves after each gate answered them.
    for index, serving in ((1, second["version"]), (2, second["version"])):
        smoke = json.loads((tmp_path / f"registration-{index}" / "smoke" / "expected.json").read_text())
        assert smoke["model_version"] == serving and len(smoke["photos"]) == 16
        assert all((tmp_path / f"registration-{index}" / "smoke" / p["file"]).stat().st_size > 0 for p in smoke["photos"])
    trained = {r["id"]: r["predicted_label"] for r in csv.DictReader((tmp_path / "eval-trained" / "predictions.csv").open())}
    assert all(p["label"] == str(int(trained[p["id"]])) for p in smoke["photos"])


def test_the_verdict_thresholds_evaluation_chose_are_served_with_the_model(model_dir, data_dir, tmp_path):
    """Evaluate chooses the thresholds; registration serves them with the model: in its files (the
    server's engine reads them), in the pyfunc's metadata, and in the model card."""
    import mlflow
    from mlflow import MlflowClient

    from bincounter import launch
    from bincounter.config import EvaluateConfig, ServeConfig
    from bincounter.serving.loading import download, engine_spec, native_folder
    from bincounter.serving.worker import load_engine

    evaluation = tmp_path / "eval"
    # An INT8 bound no graph can miss: evaluation keeps model.int8.onnx, registration serves it.
    launch.evaluate(EvaluateConfig(latency_samples=0, int8_max_accuracy_drop=1.0), str(model_dir), str(data_dir),
                    str(evaluation))
    assert (evaluation / "model.int8.onnx").is_file()
    verdicts = json.loads((evaluation / "verdict.json").read_text())
    spec = json.loads((model_dir / "model_spec.json").read_text())
    out = launch.register(RegisterConfig(model_name="verdict-test"), str(model_dir), str(evaluation), str(data_dir))
    model = mlflow.pyfunc.load_model(out["model_uri"])
    meta = model.metadata.metadata
    assert meta["verdict"] == verdicts["chosen"] and meta["temperature"] == spec["temperature"]
    assert meta["count_set_threshold"] == spec["count_set_threshold"]
    folder = download(out["model_uri"], tmp_path / "served")
    assert json.loads((native_folder(folder) / "verdict.json").read_text())["chosen"] == verdicts["chosen"]
    engine = load_engine(engine_spec(ServeConfig(), folder, tmp_path))
    assert engine.info.backend == "onnx-int8"
    assert engine.info.chosen == verdicts["chosen"]
    assert engine.info.count_set_threshold == spec["count_set_threshold"]
    card = MlflowClient().get_model_version("verdict-test", out["version"]).description
    assert "Verdict thresholds chosen on" in card and "| error rate | rule |" in card
