"""bincounter.deploy.kserve: the InferenceService overlay, its checks and the kubectl calls.

Rendering runs the real ``kubectl kustomize`` (offline); ``kubectl apply``/``wait``/``get``
are intercepted by an autospec mock of subprocess.run, so no cluster is ever contacted.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import yaml

from bincounter.config import DeployConfig
from bincounter.deploy import kserve
from bincounter.deploy import kubernetes as k8s

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
ECR = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/bincounter:1.2.3"
REAL_RUN = subprocess.run


@pytest.fixture
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed: it renders the manifests (kubectl kustomize)")
    return found


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv(k8s.MANIFESTS_ENV, raising=False)


def cfg(**overrides) -> DeployConfig:
    values = dict(target="kserve", image=ECR, namespace="models", replicas=2, model_uri="models:/bincounter/7")
    values.update(overrides)
    return DeployConfig(**values)


def isvc_of(manifest: str) -> dict:
    return next(d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "InferenceService")


def predictor_container(isvc: dict) -> dict:
    (container,) = isvc["spec"]["predictor"]["containers"]
    return container


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container["env"]}


def fake_kubectl(outputs: dict[str, tuple[int, str, str]] | None = None):
    """Real `kubectl kustomize`; for other calls a canned (rc, stdout, stderr): the first key of
    ``outputs`` found in the call (a verb, or a part such as a jsonpath), else success. A get of
    the generation answers 1 unless told otherwise."""
    outputs = {"metadata.generation": (0, "1", ""), **(outputs or {})}

    def run(cmd, *args, **kwargs):
        if cmd[1] == "kustomize":
            return REAL_RUN(cmd, *args, **kwargs)
        args = list(cmd[1:])
        while args[0] in ("--context", "--kubeconfig"):  # cluster flags come first
            args = args[2:]
        call = " ".join(args)
        key = next((k for k in sorted(outputs, key=len, reverse=True) if k in call), None)
        rc, out, err = outputs[key] if key else (0, f"{args[0]} ok\n", "")
        return subprocess.CompletedProcess(cmd, rc, stdout=out, stderr=err)

    return run


def test_dry_run_renders_image_namespace_replicas_and_model_uri(kubectl: str) -> None:
    with mock.patch.object(k8s.subprocess, "run", autospec=True, side_effect=fake_kubectl()) as run:
        result = kserve.deploy(cfg(dry_run=True), kubectl=kubectl, tracking_uri="https://mlflow.example.com")
    assert [c.args[0][1] for c in run.call_args_list] == ["kustomize"]
    assert result["target"] == "kserve" and result["applied"] is False

    isvc = isvc_of(result["manifest"])
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["namespace"] == "models"
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] == 2 and predictor["maxReplicas"] >= 2
    container = predictor_container(isvc)
    assert container["name"] == "kserve-container"
    assert container["image"] == ECR
    env = env_of(container)
    assert env["MODEL_URI"] == "models:/bincounter/7"
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    assert env["PROTOCOL"] == "v1"
    # The overlay's value carrier is local-only and must not reach the cluster.
    kinds = [d["kind"] for d in yaml.safe_load_all(result["manifest"]) if d]
    assert "ConfigMap" not in kinds
    assert result["objects"] == ["ServiceAccount/bincounter-kserve", "InferenceService/bincounter"]
    assert result["predict_path"] == "/v1/models/bincounter:predict"


def test_default_tracking_uri_and_restart_on_alias(kubectl: str) -> None:
    isvc = isvc_of(kserve.render(cfg(model_uri="models:/bincounter@champion"), kubectl=kubectl, restart=True))
    assert env_of(predictor_container(isvc))["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow.svc.cluster.local:5000"
    assert kserve.RESTART_ANNOTATION in isvc["spec"]["predictor"]["annotations"]
    pinned = isvc_of(kserve.render(cfg(), kubectl=kubectl))
    assert "annotations" not in pinned["spec"]["predictor"]


def test_replicas_above_the_base_ceiling_raise_it(kubectl: str) -> None:
    predictor = isvc_of(kserve.render(cfg(replicas=7), kubectl=kubectl))["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (7, 7)
    predictor = isvc_of(kserve.render(cfg(), kubectl=kubectl, max_replicas=10))["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 10)


def test_validate_catches_a_manifest_for_another_config(kubectl: str) -> None:
    manifest = kserve.render(cfg(), kubectl=kubectl)
    kserve.validate(manifest, cfg())
    with pytest.raises(k8s.ManifestError) as err:
        kserve.validate(manifest, cfg(image="ghcr.io/o/i:9", namespace="other", model_uri="models:/x/1", replicas=5))
    for expected in ("image", "namespace", "MODEL_URI", "minReplicas"):
        assert expected in str(err.value)


def test_validate_requires_the_v1_protocol(kubectl: str) -> None:
    manifest = kserve.render(cfg(), kubectl=kubectl).replace("value: v1", "value: v2")
    with pytest.raises(k8s.ManifestError, match="PROTOCOL"):
        kserve.validate(manifest, cfg())


def test_apply_and_wait_call_kubectl_with_exact_arguments(kubectl: str) -> None:
    outputs = {"metadata.generation": (0, "3", ""), "status.url": (0, "http://bincounter.models.example.com", "")}
    with mock.patch.object(k8s.subprocess, "run", autospec=True, side_effect=fake_kubectl(outputs)) as run:
        result = kserve.deploy(cfg(), kubectl=kubectl, context="prod", wait=True, timeout=200)
    assert result["applied"] is True and result["ready"] is True
    assert result["url"] == "http://bincounter.models.example.com"
    common = dict(capture_output=True, text=True, check=False)
    isvc, where = "inferenceservice/bincounter", ["-n", "models"]
    assert run.call_args_list[1:] == [
        mock.call([kubectl, "--context", "prod", *k8s.APPLY_ARGS], input=result["manifest"], timeout=200.0, **common),
        mock.call([kubectl, "--context", "prod", "get", isvc, *where, "-o", "jsonpath={.metadata.generation}"],
                  input=None, timeout=60, **common),
        # The spec just applied must have been seen (generation 3) before Ready means anything.
        mock.call([kubectl, "--context", "prod", "wait", "--for=jsonpath={.status.observedGeneration}=3", isvc, *where,
                   "--timeout=200s"], input=None, timeout=230.0, **common),
        mock.call([kubectl, "--context", "prod", "wait", "--for=condition=Ready", isvc, *where, "--timeout=200s"],
                  input=None, timeout=230.0, **common),
        mock.call([kubectl, "--context", "prod", "get", isvc, *where, "-o", "jsonpath={.status.url}"],
                  input=None, timeout=60, **common),
    ]


def test_missing_crd_is_explained(kubectl: str) -> None:
    stderr = 'error: resource mapping not found for name: "bincounter": no matches for kind "InferenceService" in version "serving.kserve.io/v1beta1"\nensure CRDs are installed first'
    with mock.patch.object(k8s.subprocess, "run", autospec=True, side_effect=fake_kubectl({"apply": (1, "", stderr)})):
        with pytest.raises(k8s.KubectlError, match="CRD installed") as err:
            kserve.deploy(cfg(), kubectl=kubectl)
    assert err.value.stderr == stderr


def test_missing_kubectl_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(k8s.sysconfig, "get_path", lambda name: str(tmp_path))  # nor beside this Python
    with mock.patch.object(k8s.subprocess, "run", autospec=True) as run:
        with pytest.raises(k8s.KubectlNotFoundError, match="kubectl not found on PATH"):
            kserve.deploy(cfg(dry_run=True))
    run.assert_not_called()


def test_a_canary_takes_its_share_of_traffic_in_serverless_mode(kubectl: str) -> None:
    isvc = isvc_of(kserve.render(cfg(kserve_mode="serverless", canary_percent=20), kubectl=kubectl))
    assert isvc["metadata"]["annotations"][kserve.MODE_ANNOTATION] == "Serverless"
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 20
    kserve.validate(kserve.render(cfg(kserve_mode="serverless", canary_percent=20), kubectl=kubectl),
                    cfg(kserve_mode="serverless", canary_percent=20))
    plain = isvc_of(kserve.render(cfg(), kubectl=kubectl))
    assert plain["metadata"]["annotations"][kserve.MODE_ANNOTATION] == "RawDeployment"
    assert "canaryTrafficPercent" not in plain["spec"]["predictor"]  # every request to the new revision


def test_a_canary_in_raw_mode_is_refused_with_the_reason(kubectl: str) -> None:
    with pytest.raises(k8s.ManifestError, match="needs kserve_mode='serverless'"):
        kserve.render(cfg(canary_percent=20), kubectl=kubectl)
