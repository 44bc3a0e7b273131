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
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bincounter.config import DeployConfig

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
_RFC1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class KubectlError(RuntimeError):
    """kubectl failed; ``stderr`` holds what it said."""

    def __init__(self, message: str, *, cmd: Sequence[str] = (), returncode: int | None = None, stderr: str = ""):
        super().__init__(message)
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr


class KubectlNotFoundError(KubectlError):
    """No kubectl binary to run."""


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
    found = shutil.which("kubectl")
    if found is None:
        raise KubectlNotFoundError(
            "kubectl not found on PATH. Install kubectl >= 1.27 (it renders the manifests with its "
            "built-in kustomize and applies them), or pass kubectl='/path/to/kubectl'."
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
        raise KubectlError(
            f"{_diagnose(stderr)}`{_show(cmd)}` exited with {proc.returncode}:\n{stderr}",
            cmd=cmd,
            returncode=proc.returncode,
            stderr=stderr,
        )
    return proc


def _show(cmd: Sequence[str]) -> str:
    return " ".join(cmd)


def _diagnose(stderr: str) -> str:
    """A one-line reading of kubectl's stderr for the two failures people hit first."""
    low = stderr.lower()
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
    proc = run_kubectl(kubectl, [*global_flags(context, kubeconfig), *APPLY_ARGS], input=manifest, timeout=timeout)
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


# --------------------------------------------------------------------------- serving


def overlay(
    cfg: DeployConfig,
    *,
    base: Path,
    tracking_uri: str | None = None,
    max_replicas: int | None = None,
    restart: bool = False,
) -> dict[str, Any]:
    """The kustomize overlay (as a dict) that turns ``manifests/serving`` into ``cfg``'s deployment."""
    hpa = find_object(base_documents(base), "HorizontalPodAutoscaler", APP_NAME)
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
) -> str:
    """The serving manifest for ``cfg`` as multi-document YAML (nothing is applied)."""
    check_inputs(cfg, tracking_uri)
    base = manifests_dir(manifests) / "serving"
    return render_overlay(
        base,
        overlay(cfg, base=base, tracking_uri=tracking_uri, max_replicas=max_replicas, restart=restart),
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
    problems += schema_errors(docs, k8s_version)
    if problems:
        raise ManifestError("rendered serving manifest is wrong:\n- " + "\n- ".join(problems))
    return docs


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
                         max_replicas=kwargs.get("max_replicas"), restart=bool(restart))
    docs = validate_fn(manifest, cfg, tracking_uri=tracking_uri)
    result: dict[str, Any] = {
        "target": target, "name": name, "namespace": cfg.namespace, "image": canonical_image(cfg.image),
        "model_uri": cfg.model_uri, "replicas": cfg.replicas, "objects": object_ids(docs), "manifest": manifest,
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
        extra={"url": f"http://{APP_NAME}.{cfg.namespace}.svc.cluster.local"},
    )
    if not result["applied"] or not wait:
        return result
    result["previous_revision"] = previous
    wait_or_roll_back(kubectl, flags, cfg.namespace, previous, timeout)
    result["ready"] = True
    return result


def current_revision(kubectl: str, flags: Sequence[str], namespace: str) -> str | None:
    """The Deployment's revision now (before applying), or None when it does not exist yet."""
    try:
        proc = run_kubectl(kubectl, [*flags, "get", f"deployment/{APP_NAME}", "-n", namespace, "--ignore-not-found",
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
        run_kubectl(kubectl, [*flags, "rollout", "status", f"deployment/{APP_NAME}", "-n", namespace,
                              f"--timeout={int(timeout)}s"], timeout=timeout + 30)
        return
    except KubectlError as exc:
        failure = exc
    if previous is None:
        raise RolloutError(f"deployment/{APP_NAME} did not become ready and has no earlier revision to roll back "
                           f"to: {failure}", rolled_back_to=None) from failure
    run_kubectl(kubectl, [*flags, "rollout", "undo", f"deployment/{APP_NAME}", "-n", namespace,
                          f"--to-revision={previous}"], timeout=120)
    run_kubectl(kubectl, [*flags, "rollout", "status", f"deployment/{APP_NAME}", "-n", namespace,
                          f"--timeout={int(timeout)}s"], timeout=timeout + 30)
    raise RolloutError(f"deployment/{APP_NAME} did not become ready; rolled back to revision {previous}, which "
                       f"serves again: {failure}", rolled_back_to=previous) from failure
