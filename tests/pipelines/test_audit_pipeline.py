"""The audit pipeline compiles, and its one parameter is the typed AuditConfig."""

import pytest
import yaml

from bincounter.config import AuditConfig, ClusterConfig
from pipelines.audit_pipeline import compile_audit_pipeline


def test_audit_pipeline_compiles_with_the_typed_config_as_its_default(tmp_path):
    spec, platform = yaml.safe_load_all(compile_audit_pipeline(tmp_path / "audit.yaml").read_text())
    assert spec["pipelineInfo"]["name"] == "bincounter-audit"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"config"} and params["config"]["parameterType"] == "STRUCT"
    # KFP stores numbers as floats and cannot hold None: the default must still validate to AuditConfig(),
    # logging to the cluster's tracking server (a store in the pod would be lost with it).
    assert AuditConfig.model_validate(params["config"]["defaultValue"]) == AuditConfig(
        tracking_uri=ClusterConfig().tracking_uri)
    task = spec["root"]["dag"]["tasks"]["audit"]
    assert task["cachingOptions"] == {}  # caching off: a recurring run counts the photos as they are now
    executor = spec["deploymentSpec"]["executors"]["exec-audit"]["container"]
    assert executor["image"] == "ghcr.io/bincounter/bincounter:0.1.0"
    secrets = {s["secretName"] for s in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
               ["exec-audit"]["secretAsEnv"]}
    assert secrets == {"aws-credentials", "mlflow-credentials"}
    assert task["retryPolicy"]["maxRetryCount"] == 3
    outputs = spec["components"]["comp-audit"]["outputDefinitions"]["artifacts"]
    assert outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.HTML"


def test_cli_compiles_the_audit_pipeline(tmp_path, capsys):
    from bincounter.cli import main

    main(["pipeline", "compile-audit", "--out", str(tmp_path / "a.yaml")])
    assert (tmp_path / "a.yaml").exists() and "compiled" in capsys.readouterr().out


@pytest.mark.slow
def test_audit_pipeline_runs_on_kfp_local_and_shows_metrics_and_report(tmp_path, isolated_home):
    """The component validates its config dict, audits, and fills its Metrics and HTML outputs."""
    import json
    import warnings

    from kfp import local

    from bincounter.config import SourceConfig, VerdictConfig
    from bincounter_demo.synth import SynthConfig, generate
    from components.audit import audit
    from tests.fake_counter import register_fake

    pod = tmp_path / "pod"
    generate(SynthConfig(n_images=12, image_size=48, seed=4), pod)
    register_fake(pod, tmp_path)
    meta = pod / "metadata" / "00004.json"
    planted = json.loads(meta.read_text())
    planted["EXPECTED_QUANTITY"] = (planted["EXPECTED_QUANTITY"] + 3) % 6
    meta.write_text(json.dumps(planted))
    cfg = AuditConfig(source=SourceConfig(uri=str(pod)), verdict=VerdictConfig(), progress=False, workers=2)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"), raise_on_error=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        task = audit(config=cfg.model_dump(mode="json", exclude_none=True))
    metrics = task.outputs["metrics"].metadata
    assert metrics["mismatches"] == 1 and metrics["checked"] == 12
    report = open(task.outputs["report"].path).read()
    assert "<h1>Bin audit</h1>" in report and "00004" in report
