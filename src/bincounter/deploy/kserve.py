"""Deploy the model server as a KServe InferenceService (custom predictor, v1 protocol).

``manifests/kserve`` holds the InferenceService. :func:`deploy` renders it through a
kustomize overlay that sets the image, namespace, replica bounds and model URI, checks
the result and applies it with ``kubectl apply -f -``; ``cfg.dry_run`` stops after the
check and returns the manifest. Requests then go to
``POST /v1/models/bincounter:predict`` on the InferenceService's URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from bincounter.config import DeployConfig
from bincounter.deploy.kubernetes import (
    base_documents,
    canonical_image,
    check_deployable,
    check_inputs,
    check_namespace,
    check_secret_env,
    container_index,
    DEFAULT_K8S_VERSION,
    env_patch,
    find_kubectl,
    find_object,
    image_override,
    KubectlError,
    load_documents,
    ManifestError,
    manifests_dir,
    render_and_apply,
    render_overlay,
    restart_stamp,
    run_kubectl_retrying,
    schema_errors,
    secret_env,
)

API_VERSION = "serving.kserve.io/v1beta1"
ISVC_NAME = "bincounter"
#: KServe finds the predictor container by this name.
CONTAINER = "kserve-container"
RESTART_ANNOTATION = "bincounter.dev/restarted-at"
#: The local-only ConfigMap that carries overlay values into the InferenceService's env.
_VALUES = "bincounter-kserve-values"


def _env_path(name: str) -> str:
    return f"spec.predictor.containers.[name={CONTAINER}].env.[name={name}].value"


def overlay(
    cfg: DeployConfig,
    *,
    base: Path,
    tracking_uri: str | None = None,
    max_replicas: int | None = None,
    restart: bool = False,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The kustomize overlay (as a dict) that turns ``manifests/kserve`` into ``cfg``'s InferenceService;
    ``labels`` (the pinned model's version, run and digest) annotate it and its predictor's pods."""
    isvc = find_object(base_documents(base), "InferenceService", ISVC_NAME)
    if isvc is None:
        raise ManifestError(f"{base} has no InferenceService/{ISVC_NAME}")
    predictor = isvc.get("spec", {}).get("predictor", {})
    base_max = int(predictor.get("maxReplicas", cfg.replicas))
    if max_replicas is not None and max_replicas < cfg.replicas:
        raise ValueError(f"max_replicas={max_replicas} is below replicas={cfg.replicas}")
    ceiling = max(cfg.replicas, base_max if max_replicas is None else max_replicas)

    values = {"MODEL_URI": cfg.model_uri}
    if tracking_uri:
        values["MLFLOW_TRACKING_URI"] = tracking_uri
    ops: list[dict[str, Any]] = [
        {"op": "add", "path": "/spec/predictor/minReplicas", "value": cfg.replicas},
        {"op": "add", "path": "/spec/predictor/maxReplicas", "value": ceiling},
    ]
    if restart:
        # A changed predictor annotation makes KServe roll out fresh pods, which reload
        # a moved alias such as models:/bincounter@champion.
        if "annotations" in predictor:
            ops.append({"op": "add", "path": "/spec/predictor/annotations/" + RESTART_ANNOTATION.replace("/", "~1"), "value": restart_stamp()})
        else:
            ops.append({"op": "add", "path": "/spec/predictor/annotations", "value": {RESTART_ANNOTATION: restart_stamp()}})
    secrets = secret_env(cfg)
    if secrets:
        index = container_index(predictor, CONTAINER)
        ops += env_patch(f"/spec/predictor/containers/{index}", secrets)
    ops += rollout_ops(cfg, isvc)
    if labels:
        if "annotations" not in predictor and not restart:
            ops.append({"op": "add", "path": "/spec/predictor/annotations", "value": {}})
        if "annotations" not in isvc.get("metadata", {}):
            ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
        for key, value in labels.items():
            escaped = key.replace("~", "~0").replace("/", "~1")
            ops += [{"op": "add", "path": f"/metadata/annotations/{escaped}", "value": value},
                    {"op": "add", "path": f"/spec/predictor/annotations/{escaped}", "value": value}]
    return {
        "namespace": cfg.namespace,
        "images": [image_override(cfg.image)],
        # Env values live inside a CRD, where kustomize cannot wire a ConfigMap by name;
        # replacements copy them from a local-only ConfigMap (dropped from the output).
        "configMapGenerator": [
            {
                "name": _VALUES,
                "literals": [f"{key}={value}" for key, value in values.items()],
                "options": {
                    "disableNameSuffixHash": True,
                    "annotations": {"config.kubernetes.io/local-config": "true"},
                },
            }
        ],
        "replacements": [
            {
                "source": {"kind": "ConfigMap", "name": _VALUES, "fieldPath": f"data.{key}"},
                "targets": [{"select": {"kind": "InferenceService", "name": ISVC_NAME}, "fieldPaths": [_env_path(key)]}],
            }
            for key in values
        ],
        "patches": [
            {
                "target": {"group": "serving.kserve.io", "kind": "InferenceService", "name": ISVC_NAME},
                "patch": yaml.safe_dump(ops),
            }
        ],
    }


MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
MODES = {"raw": "RawDeployment", "serverless": "Serverless"}


def rollout_ops(cfg: DeployConfig, isvc: dict[str, Any]) -> list[dict[str, Any]]:
    """The deployment mode, and the canary's share of traffic: KServe sends ``canary_percent`` of
    the requests to the new revision and the rest to the last ready one, which needs its
    Serverless (Knative) mode; a Raw Deployment has no traffic split, so a canary there is refused."""
    if cfg.canary_percent and cfg.kserve_mode != "serverless":
        raise ManifestError(f"canary_percent={cfg.canary_percent} needs kserve_mode='serverless' (Knative): KServe's "
                            "raw Deployment mode has no traffic split between revisions")
    key = MODE_ANNOTATION.replace("/", "~1")
    verb = "replace" if MODE_ANNOTATION in isvc.get("metadata", {}).get("annotations", {}) else "add"
    ops = [{"op": verb, "path": f"/metadata/annotations/{key}", "value": MODES[cfg.kserve_mode]}]
    if cfg.canary_percent:
        ops.append({"op": "add", "path": "/spec/predictor/canaryTrafficPercent", "value": cfg.canary_percent})
    return ops


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
    """The InferenceService manifest for ``cfg`` as multi-document YAML (nothing is applied)."""
    check_inputs(cfg, tracking_uri)
    base = manifests_dir(manifests) / "kserve"
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
    """Check that the rendered manifest deploys ``cfg`` as an InferenceService; returns its objects.

    KServe's CRD schema is not available offline, so the fields that matter are checked
    here: the v1beta1 API, a custom predictor container named ``kserve-container`` with
    our image, the v1 protocol on port 8080, the model URI, the replica bounds and the
    namespace. Built-in kinds beside it are schema-checked with kubernetes-validate.
    """
    docs = load_documents(manifest)
    problems = check_namespace(docs, cfg.namespace)
    isvc = find_object(docs, "InferenceService", ISVC_NAME)
    if isvc is None:
        problems.append(f"no InferenceService/{ISVC_NAME}")
    else:
        if isvc.get("apiVersion") != API_VERSION:
            problems.append(f"InferenceService apiVersion {isvc.get('apiVersion')!r} != {API_VERSION!r}")
        predictor = isvc.get("spec", {}).get("predictor", {})
        mode = isvc.get("metadata", {}).get("annotations", {}).get(MODE_ANNOTATION)
        if mode != MODES[cfg.kserve_mode]:
            problems.append(f"deployment mode {mode!r} != {MODES[cfg.kserve_mode]!r}")
        if predictor.get("canaryTrafficPercent") != (cfg.canary_percent or None):
            problems.append(f"canaryTrafficPercent {predictor.get('canaryTrafficPercent')} != {cfg.canary_percent or None}")
        if predictor.get("minReplicas") != cfg.replicas:
            problems.append(f"predictor minReplicas {predictor.get('minReplicas')} != {cfg.replicas}")
        if int(predictor.get("maxReplicas", 0)) < cfg.replicas:
            problems.append(f"predictor maxReplicas {predictor.get('maxReplicas')} < {cfg.replicas}")
        containers = predictor.get("containers", [])
        container = next((c for c in containers if c.get("name") == CONTAINER), None)
        if container is None:
            problems.append(f"predictor has no container named {CONTAINER!r}")
        else:
            if container.get("image") != canonical_image(cfg.image):
                problems.append(f"image {container.get('image')!r} != {canonical_image(cfg.image)!r}")
            env = {e.get("name"): e.get("value") for e in container.get("env", [])}
            if env.get("MODEL_URI") != cfg.model_uri:
                problems.append(f"MODEL_URI {env.get('MODEL_URI')!r} != {cfg.model_uri!r}")
            if tracking_uri and env.get("MLFLOW_TRACKING_URI") != tracking_uri:
                problems.append(f"MLFLOW_TRACKING_URI {env.get('MLFLOW_TRACKING_URI')!r} != {tracking_uri!r}")
            problems += check_secret_env(container, cfg)
            if env.get("PROTOCOL", "v1") != "v1":
                problems.append(f"PROTOCOL {env.get('PROTOCOL')!r} is not the v1 protocol the server speaks")
            ports = [p.get("containerPort") for p in container.get("ports", [])]
            if ports != [8080]:
                problems.append(f"container ports {ports} != [8080]")
    problems += schema_errors(docs, k8s_version)
    if problems:
        raise ManifestError("rendered InferenceService manifest is wrong:\n- " + "\n- ".join(problems))
    return docs


def wait_for_generation(kubectl: str, flags: list[str], namespace: str, timeout: float) -> str:
    """Wait until KServe has seen the spec just applied (``status.observedGeneration`` reaches its
    ``metadata.generation``) and then until it is Ready: waiting for Ready alone could pass on the
    previous revision's Ready before the controller looked at the new spec. Returns the generation."""
    isvc = f"inferenceservice/{ISVC_NAME}"
    generation = run_kubectl_retrying(kubectl, [*flags, "get", isvc, "-n", namespace, "-o",
                                                "jsonpath={.metadata.generation}"], timeout=60).stdout.strip()
    if not generation.isdigit():
        raise KubectlError(f"{isvc} in {namespace} reports no metadata.generation ({generation!r})")
    for condition in (f"--for=jsonpath={{.status.observedGeneration}}={generation}", "--for=condition=Ready"):
        run_kubectl_retrying(kubectl, [*flags, "wait", condition, isvc, "-n", namespace, f"--timeout={int(timeout)}s"],
                             timeout=timeout + 30)
    return generation


def check(cfg: DeployConfig, **kwargs: Any) -> dict[str, Any]:
    """Whether ``deploy(cfg, **kwargs)`` can do its work: kubectl, the InferenceService renders for
    ``cfg``, and the identity kubectl uses may apply it (``kubernetes.check_deployable``)."""
    return check_deployable(cfg, kwargs, render_fn=render, validate_fn=validate, target="kserve")


def deploy(cfg: DeployConfig, **kwargs: Any) -> dict[str, Any]:
    """Render, validate and (unless ``cfg.dry_run``) apply the InferenceService for ``cfg``.

    Keyword arguments are those of :func:`bincounter.deploy.kubernetes.deploy`
    (manifests, kubectl, context, kubeconfig, tracking_uri, max_replicas, restart, wait,
    timeout); ``wait`` (default True) waits for the InferenceService to report Ready. A new
    revision that never gets ready takes no traffic: KServe keeps serving the last ready one.

    Returns ``{"target": "kserve", "manifest": <yaml>, "applied": bool, ...}``.
    """
    result, kubectl, flags, timeout = render_and_apply(
        cfg, kwargs, render_fn=render, validate_fn=validate, target="kserve", name=ISVC_NAME,
        extra={"predict_path": f"/v1/models/{ISVC_NAME}:predict"},
    )
    if not result["applied"]:
        return result
    if kwargs.get("wait", True):
        wait_for_generation(kubectl, flags, cfg.namespace, timeout)
        url = run_kubectl_retrying(
            kubectl,
            [*flags, "get", f"inferenceservice/{ISVC_NAME}", "-n", cfg.namespace, "-o", "jsonpath={.status.url}"],
            timeout=60,
        ).stdout.strip()
        result["ready"] = True
        result["url"] = url or None
    return result
