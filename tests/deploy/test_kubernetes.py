"""bincounter.deploy.kubernetes: overlay rendering, validation and the kubectl calls.

Rendering runs the real ``kubectl kustomize`` (offline); every ``kubectl apply`` is
intercepted by an autospec mock of subprocess.run, so no cluster is ever contacted.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import yaml

from bincounter.config import DeployConfig
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
    # A kubeconfig pointing nowhere: should anything slip past the mocks, it cannot reach a cluster.
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv(k8s.MANIFESTS_ENV, raising=False)


def cfg(**overrides) -> DeployConfig:
    values = dict(target="kubernetes", image=ECR, namespace="prod-ml", replicas=3, model_uri="models:/bincounter/7")
    values.update(overrides)
    return DeployConfig(**values)


def docs_of(manifest: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(manifest) if d]


def find(docs: list[dict], kind: str) -> dict:
    return next(d for d in docs if d["kind"] == kind)


def fake_kubectl_apply(stdout: str = "deployment.apps/bincounter configured\n", returncode: int = 0, stderr: str = ""):
    """A subprocess.run stand-in: real `kubectl kustomize`, canned answers for everything else."""

    def run(cmd, *args, **kwargs):
        if cmd[1] == "kustomize":
            return REAL_RUN(cmd, *args, **kwargs)
        return subprocess.CompletedProcess(cmd, returncode, stdout=stdout, stderr=stderr)

    return run


# --------------------------------------------------------------------------- rendering


def test_dry_run_renders_image_namespace_replicas_and_model_uri(kubectl: str) -> None:
    with mock.patch.object(k8s.subprocess, "run", autospec=True, side_effect=fake_kubectl_apply()) as run:
        result = k8s.deploy(cfg(dry_run=True), kubectl=kubectl)
    assert [c.args[0][1] for c in run.call_args_list] == ["kustomize"]  # nothing applied
    assert result["target"] == "kubernetes" and result["applied"] is False and result["dry_run"] is True

    docs = docs_of(result["manifest"])
    assert find(docs, "Namespace")["metadata"]["name"] == "prod-ml"
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"prod-ml"}
    deployment = find(docs, "Deployment")
    assert "replicas" not in deployment["spec"]  # its HPA owns the count
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == ECR
    configmap = find(docs, "ConfigMap")
    assert configmap["data"]["MODEL_URI"] == "models:/bincounter/7"
    # The manifest's in-cluster MLflow stays unless a tracking URI is passed.
    assert configmap["data"]["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow.svc.cluster.local:5000"
    ref = {e["name"]: e for e in container["env"]}["MODEL_URI"]["valueFrom"]["configMapKeyRef"]
    assert ref["name"] == configmap["metadata"]["name"]
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] >= 3
    assert "Deployment/bincounter" in result["objects"]
    assert result["url"] == "http://bincounter.prod-ml.svc.cluster.local"


def test_the_repository_is_not_modified(kubectl: str) -> None:
    before = {p: p.read_bytes() for p in (MANIFESTS / "serving").rglob("*") if p.is_file()}
    k8s.deploy(cfg(dry_run=True), kubectl=kubectl)
    assert {p: p.read_bytes() for p in (MANIFESTS / "serving").rglob("*") if p.is_file()} == before


def test_tracking_uri_and_hpa_ceiling(kubectl: str) -> None:
    manifest = k8s.render(cfg(replicas=2), kubectl=kubectl, tracking_uri="https://mlflow.example.com", max_replicas=9)
    docs = docs_of(manifest)
    assert find(docs, "ConfigMap")["data"]["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 9)
    with pytest.raises(ValueError, match="max_replicas"):
        k8s.render(cfg(replicas=4), kubectl=kubectl, max_replicas=2)


@pytest.mark.parametrize(
    ("image", "rendered"),
    [
        ("registry.local:5000/team/bc", "registry.local:5000/team/bc:latest"),
        ("registry.local:5000/team/bc:7", "registry.local:5000/team/bc:7"),
        ("ghcr.io/x/y@sha256:" + "a" * 64, "ghcr.io/x/y@sha256:" + "a" * 64),
    ],
)
def test_image_references(kubectl: str, image: str, rendered: str) -> None:
    docs = docs_of(k8s.render(cfg(image=image), kubectl=kubectl))
    assert find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"] == rendered


def test_alias_model_uri_restarts_pods(kubectl: str) -> None:
    """Redeploying models:/x@champion after the alias moved must roll the pods."""
    moved = k8s.deploy(cfg(model_uri="models:/bincounter@champion", dry_run=True), kubectl=kubectl)
    pinned = k8s.deploy(cfg(dry_run=True), kubectl=kubectl)
    annotations = lambda r: find(docs_of(r["manifest"]), "Deployment")["spec"]["template"]["metadata"].get("annotations", {})  # noqa: E731
    assert k8s.RESTART_ANNOTATION in annotations(moved)
    assert k8s.RESTART_ANNOTATION not in annotations(pinned)


def test_manifests_folder_from_environment(kubectl: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy)
    hpa = copy / "serving" / "hpa.yaml"
    hpa.write_text(hpa.read_text().replace("maxReplicas: 6", "maxReplicas: 42"))
    monkeypatch.setenv(k8s.MANIFESTS_ENV, str(copy))
    assert find(docs_of(k8s.render(cfg(), kubectl=kubectl)), "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 42
    # The explicit argument wins over the environment.
    assert find(docs_of(k8s.render(cfg(), kubectl=kubectl, manifests=MANIFESTS)), "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 6


def test_missing_manifests_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="BINCOUNTER_MANIFESTS"):
        k8s.manifests_dir(tmp_path / "nowhere")


# --------------------------------------------------------------------------- validation


def test_validate_catches_a_manifest_for_another_config(kubectl: str) -> None:
    manifest = k8s.render(cfg(), kubectl=kubectl)
    k8s.validate(manifest, cfg())
    with pytest.raises(k8s.ManifestError) as err:
        k8s.validate(manifest, cfg(image="ghcr.io/other/img:1", namespace="elsewhere", replicas=1, model_uri="models:/other/1"))
    message = str(err.value)
    for expected in ("image", "namespace", "replicas", "MODEL_URI"):
        assert expected in message


def test_validate_catches_schema_errors(kubectl: str) -> None:
    pytest.importorskip("kubernetes_validate")
    manifest = k8s.render(cfg(), kubectl=kubectl).replace("maxUnavailable: 1", "maxUnavailable: 1\n  bogusField: 1")
    with pytest.raises(k8s.ManifestError, match="bogusField"):
        k8s.validate(manifest, cfg())


@pytest.mark.parametrize("bad", [dict(namespace="Prod_ML"), dict(model_uri="models:/x\n  evil: 1")])
def test_inputs_that_cannot_be_rendered(kubectl: str, bad: dict) -> None:
    with pytest.raises(ValueError):
        k8s.render(cfg(**bad), kubectl=kubectl)


# --------------------------------------------------------------------------- apply


def test_apply_pipes_the_manifest_to_kubectl_apply(kubectl: str) -> None:
    with mock.patch.object(k8s.subprocess, "run", autospec=True, side_effect=fake_kubectl_apply()) as run:
        result = k8s.deploy(cfg(), kubectl=kubectl, context="prod", kubeconfig="/etc/kube/config", wait=False)
    assert result["applied"] is True
    assert result["kubectl_output"] == "deployment.apps/bincounter configured\n"
    assert run.call_count == 2
    assert run.call_args_list[-1] == mock.call(
        [kubectl, "--kubeconfig", "/etc/kube/config", "--context", "prod", "apply", "--server-side",
         "--field-manager=bincounter", "--force-conflicts", "-f", "-"],
        input=result["manifest"],
        capture_output=True,
        text=True,
        timeout=300.0,
        check=False,
    )


def test_wait_checks_the_rollout(kubectl: str) -> None:
    with mock.patch.object(k8s.subprocess, "run", autospec=True, side_effect=fake_kubectl_apply()) as run:
        result = k8s.deploy(cfg(), kubectl=kubectl, wait=True, timeout=120)
    assert result["ready"] is True
    assert run.call_args_list[0].args[0][1:4] == ["get", "deployment/bincounter", "-n"]  # the revision to return to
    assert run.call_args_list[-2].args[0] == [kubectl, *k8s.APPLY_ARGS]
    assert run.call_args_list[-1] == mock.call(
        [kubectl, "rollout", "status", "deployment/bincounter", "-n", "prod-ml", "--timeout=120s"],
        input=None,
        capture_output=True,
        text=True,
        timeout=150.0,
        check=False,
    )


def test_unreachable_cluster_error_carries_stderr(kubectl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = "The connection to the server localhost:8080 was refused - did you specify the right host or port?"
    waits: list[float] = []
    monkeypatch.setattr(k8s, "pause", waits.append)
    with mock.patch.object(k8s.subprocess, "run", autospec=True,
                           side_effect=fake_kubectl_apply(returncode=1, stderr=stderr)) as run:
        with pytest.raises(k8s.KubectlError) as err:
            k8s.deploy(cfg(), kubectl=kubectl, wait=False)
    assert "cannot reach the Kubernetes cluster" in str(err.value)
    assert stderr in str(err.value) and err.value.stderr == stderr
    assert err.value.returncode == 1 and err.value.cmd[1:] == list(k8s.APPLY_ARGS)
    # An unreachable API server may come back: the apply was tried 4 times, 5 s apart and doubling.
    assert [c.args[0][1] for c in run.call_args_list].count("apply") == 4 and waits == [5.0, 10.0, 20.0]


@pytest.mark.parametrize(("stderr", "error"), [
    ('Error from server (Forbidden): deployments.apps "bincounter" is forbidden: User '
     '"system:serviceaccount:kubeflow:pipeline-runner" cannot patch resource "deployments"', k8s.ForbiddenError),
    ("error: error validating data: unknown field \"replicaz\"", k8s.KubectlError),
])
def test_what_a_retry_cannot_fix_fails_at_once(kubectl: str, monkeypatch: pytest.MonkeyPatch, stderr: str,
                                                error: type) -> None:
    monkeypatch.setattr(k8s, "pause", lambda s: pytest.fail("waited for a retry that cannot help"))
    with mock.patch.object(k8s.subprocess, "run", autospec=True,
                           side_effect=fake_kubectl_apply(returncode=1, stderr=stderr)) as run:
        with pytest.raises(error) as err:
            k8s.deploy(cfg(), kubectl=kubectl, wait=False)
    assert [c.args[0][1] for c in run.call_args_list].count("apply") == 1
    if error is k8s.ForbiddenError:
        assert "bincounter pipeline rbac" in str(err.value)


def test_a_conflict_is_retried_and_then_applies(kubectl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(k8s, "pause", lambda s: None)
    answers = iter([(1, "Operation cannot be fulfilled on deployments.apps \"bincounter\": the object has been "
                        "modified; please apply your changes to the latest version and try again"), (0, "")])

    def run(cmd, *args, **kwargs):
        if cmd[1] == "kustomize":
            return REAL_RUN(cmd, *args, **kwargs)
        code, err = next(answers)
        return subprocess.CompletedProcess(cmd, code, stdout="deployment.apps/bincounter serverside-applied\n",
                                           stderr=err)

    with mock.patch.object(k8s.subprocess, "run", autospec=True, side_effect=run):
        result = k8s.deploy(cfg(), kubectl=kubectl, wait=False)
    assert result["applied"] and "serverside-applied" in result["kubectl_output"]


def test_missing_kubectl_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no kubectl anywhere
    monkeypatch.setattr(k8s.sysconfig, "get_path", lambda name: str(tmp_path))  # nor beside this Python
    with mock.patch.object(k8s.subprocess, "run", autospec=True) as run:
        with pytest.raises(k8s.KubectlNotFoundError, match="kubectl not found on PATH"):
            k8s.deploy(cfg(dry_run=True))
        with pytest.raises(k8s.KubectlNotFoundError, match="kubectl not found at"):
            k8s.deploy(cfg(), kubectl=str(tmp_path / "kubectl"))
    run.assert_not_called()


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("image", "parts"),
    [
        ("ghcr.io/bincounter/bincounter:0.1.0", ("ghcr.io/bincounter/bincounter", "0.1.0", None)),
        ("localhost:5000/bc", ("localhost:5000/bc", "latest", None)),
        ("bc@sha256:" + "b" * 64, ("bc", None, "sha256:" + "b" * 64)),
    ],
)
def test_split_image(image: str, parts: tuple) -> None:
    assert k8s.split_image(image) == parts


@pytest.mark.parametrize(
    ("uri", "mutable"),
    [
        ("models:/bincounter@champion", True),
        ("models:/bincounter/latest", True),
        ("models:/bincounter/Production", True),
        ("models:/bincounter/7", False),
        ("runs:/abc/model", False),
        ("s3://bucket/model", False),
    ],
)
def test_is_mutable_model_uri(uri: str, mutable: bool) -> None:
    assert k8s.is_mutable_model_uri(uri) is mutable


# --------------------------------------------------------------------------- rollout, on a fake kubectl


FAKE_KUBECTL = """#!{python}
# A kubectl on PATH for one test: real `kustomize`, a Deployment at revision {revision!r} whose
# next rollout {outcome}; every call is logged, one line of JSON each.
import json, os, subprocess, sys
args = sys.argv[1:]
log = os.path.join(os.path.dirname(__file__), "calls.jsonl")
stdin = sys.stdin.read() if "-f" in args else ""
with open(log, "a") as f:
    f.write(json.dumps({{"args": args, "stdin_kinds": [l[6:] for l in stdin.splitlines() if l.startswith("kind: ")]}}) + "\\n")
verb = args[0]
undone = any(json.loads(l)["args"][:2] == ["rollout", "undo"] for l in open(log))
if verb == "kustomize":
    sys.exit(subprocess.run([{real!r}, *args]).returncode)
if verb == "get":
    print({revision!r} or "", end="")
elif verb == "apply":
    print("deployment.apps/bincounter serverside-applied")
elif args[:2] == ["rollout", "status"]:
    if {outcome!r} == "fails" and not undone:
        print('error: deployment "bincounter" exceeded its progress deadline', file=sys.stderr)
        sys.exit(1)
    print('deployment "bincounter" successfully rolled out')
elif args[:2] == ["rollout", "undo"]:
    print("deployment.apps/bincounter rolled back")
else:
    print("unexpected: " + " ".join(args), file=sys.stderr)
    sys.exit(2)
"""


def fake_kubectl_on_path(tmp_path: Path, monkeypatch, kubectl: str, revision: str, outcome: str) -> Path:
    import sys

    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "kubectl"
    script.write_text(FAKE_KUBECTL.format(python=sys.executable, real=kubectl, revision=revision, outcome=outcome))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{__import__('os').environ['PATH']}")
    return folder / "calls.jsonl"


def _calls(log: Path) -> list[list[str]]:
    import json

    return [json.loads(line)["args"] for line in log.read_text().splitlines()]


def test_a_rollout_that_never_gets_ready_is_rolled_back_to_the_previous_revision(kubectl, tmp_path, monkeypatch):
    log = fake_kubectl_on_path(tmp_path, monkeypatch, kubectl, revision="4", outcome="fails")
    with pytest.raises(k8s.RolloutError, match="rolled back to revision 4") as err:
        k8s.deploy(cfg(), timeout=5)
    assert err.value.rolled_back_to == "4"
    verbs = [c[0] if c[0] != "rollout" else " ".join(c[:2]) for c in _calls(log)]
    assert verbs == ["get", "kustomize", "apply", "rollout status", "rollout undo", "rollout status"]
    calls = _calls(log)
    assert calls[2] == list(k8s.APPLY_ARGS)  # server-side apply
    assert calls[4] == ["rollout", "undo", "deployment/bincounter", "-n", "prod-ml", "--to-revision=4"]


def test_a_ready_rollout_is_not_touched(kubectl, tmp_path, monkeypatch):
    log = fake_kubectl_on_path(tmp_path, monkeypatch, kubectl, revision="4", outcome="succeeds")
    result = k8s.deploy(cfg(), timeout=5)
    assert result["ready"] is True and result["previous_revision"] == "4"
    assert not any(c[:2] == ["rollout", "undo"] for c in _calls(log))


def test_a_first_rollout_that_fails_says_there_is_nothing_to_return_to(kubectl, tmp_path, monkeypatch):
    fake_kubectl_on_path(tmp_path, monkeypatch, kubectl, revision="", outcome="fails")
    with pytest.raises(k8s.RolloutError, match="no earlier revision") as err:
        k8s.deploy(cfg(), timeout=5)
    assert err.value.rolled_back_to is None


# --------------------------------------------------------------------------- the smoke check after a rollout


class Pods:
    """The new pods behind the Service: answer /v1/count with a label and a version per photo."""

    def __init__(self, answer):
        from tests.json_server import JsonServer

        self.asked = 0

        def respond(method, path, headers, body):
            self.asked += 1
            return 200, answer(body)

        self.server = JsonServer(respond)
        self.url = self.server.url

    def close(self):
        self.server.close()


def smoke_set(folder: Path, version: str = "7") -> Path:
    """Three photos (their bytes say their class) and the answers the version's evaluation gave."""
    import json

    folder.mkdir()
    photos = []
    for k, label in enumerate(["2", "5", "0"]):
        (folder / f"{k:03d}.jpg").write_bytes(f"photo of {label}".encode())
        photos.append({"file": f"{k:03d}.jpg", "id": f"0000{k}", "label": label})
    (folder / "expected.json").write_text(json.dumps({"model_version": version, "photos": photos}))
    return folder


@pytest.mark.parametrize(("answer", "outcome"), [
    (lambda body: {"label": body.decode().split()[-1], "model_version": "7"}, "kept"),
    (lambda body: {"label": "3", "model_version": "7"}, "undone"),  # a version that counts wrong here
    (lambda body: {"label": body.decode().split()[-1], "model_version": "6"}, "undone"),  # the old pods answer
])
def test_pods_that_answer_the_known_photos_worse_than_their_evaluation_are_rolled_back(
        kubectl, tmp_path, monkeypatch, answer, outcome):
    log = fake_kubectl_on_path(tmp_path, monkeypatch, kubectl, revision="4", outcome="succeeds")
    pods = Pods(answer)
    try:
        if outcome == "kept":
            result = k8s.deploy(cfg(), timeout=5, smoke_dir=smoke_set(tmp_path / "smoke"), service_url=pods.url)
            assert (result["smoke_photos"], result["smoke_agreed"]) == (3, 3)
            assert not any(c[:2] == ["rollout", "undo"] for c in _calls(log))
        else:
            with pytest.raises(k8s.RolloutError, match="answered 0 of 3 known photos.*rolled back to revision 4"):
                k8s.deploy(cfg(), timeout=5, smoke_dir=smoke_set(tmp_path / "smoke"), service_url=pods.url)
            assert ["rollout", "undo", "deployment/bincounter", "-n", "prod-ml", "--to-revision=4"] in _calls(log)
    finally:
        pods.close()
    assert pods.asked == 3


def test_a_service_the_deploy_step_cannot_reach_fails_the_smoke_check(kubectl, tmp_path, monkeypatch):
    from bincounter_demo.s3server import free_port

    fake_kubectl_on_path(tmp_path, monkeypatch, kubectl, revision="4", outcome="succeeds")
    with pytest.raises(k8s.RolloutError, match="answered 0 of 3.*Connection refused"):
        k8s.deploy(cfg(), timeout=5, smoke_dir=smoke_set(tmp_path / "smoke"),
                   service_url=f"http://127.0.0.1:{free_port()}")
