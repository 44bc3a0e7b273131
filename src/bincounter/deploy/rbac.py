"""The RBAC a cluster run needs, rendered for its namespaces and service account.

``bincounter pipeline rbac`` prints these objects (``kubectl apply -f -``); ``manifests/pipeline``
holds them rendered for the defaults (runs in ``kubeflow``, serving in ``bincounter``), which a
test keeps equal to :func:`render`. What each grants:

- the deploy step: every kind the serving trees (``manifests/serving``, ``manifests/kserve``)
  render, in the serving namespace only (:func:`bincounter.deploy.kubernetes.required_permissions`,
  the same list the pipeline's check task asks ``kubectl auth can-i`` about), and get/patch on
  that one Namespace object;
- the project's own service account (``bincounter-pipeline``) also what KFP's driver, launcher
  and Argo's executor do in the run's namespace (read the launcher config maps and the artifact
  store's secret, read its own pod, report task results). KFP's ``pipeline-runner`` and a
  profile's ``default-editor`` have that already.
"""

from __future__ import annotations

from typing import Any

import yaml

from bincounter.config import ClusterConfig, DeployConfig
from bincounter.deploy import kserve, kubernetes

OWN_SERVICE_ACCOUNT = "bincounter-pipeline"
#: KFP's standalone install runs pipelines as this service account in its own namespace.
KFP_DEFAULT = ("kubeflow", "pipeline-runner")
DEPLOYER = "bincounter-deployer"
RUNNER = "bincounter-pipeline-runner"
LABELS = {"app.kubernetes.io/name": "bincounter", "app.kubernetes.io/component": "pipeline",
          "app.kubernetes.io/part-of": "bincounter"}
#: KFP v2's driver and launcher (kfp-launcher and metadata config maps, the artifact store's
#: secret, their own pod, the run's workflow) and Argo's executor (task results; pods patch for
#: Argo 3.3), as KFP 2.17's pipeline-runner Role grants them.
RUNNER_RULES = [
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]},
    {"apiGroups": ["argoproj.io"], "resources": ["workflows"], "verbs": ["get"]},
]


def _meta(name: str, namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = dict(LABELS)
    return meta


def run_service_account(cluster: ClusterConfig) -> str:
    return cluster.service_account or OWN_SERVICE_ACCOUNT


def deployer_rules(cluster: ClusterConfig, *, manifests: str | None = None, kubectl: str | None = None) -> list[dict]:
    """One rule per (group, resource) the serving trees render for ``cluster``'s serving namespace."""
    cfg = DeployConfig(namespace=cluster.serving_namespace, image=cluster.image_of("serving"),
                       mlflow_secret=cluster.mlflow_secret, aws_secret=cluster.aws_secret)
    docs: list[dict[str, Any]] = []
    for target in (kubernetes, kserve):
        docs += kubernetes.load_documents(target.render(cfg, manifests=manifests, kubectl=kubectl,
                                                        tracking_uri=cluster.tracking_uri))
    return [{"apiGroups": [group], "resources": [resource], "verbs": list(verbs)}
            for (group, resource), verbs in kubernetes.required_permissions(docs).items()]


def render(cluster: ClusterConfig, *, manifests: str | None = None, kubectl: str | None = None) -> list[dict]:
    """The RBAC objects for runs in ``cluster.namespace`` as ``cluster.service_account`` (default
    ``bincounter-pipeline``) that deploy to ``cluster.serving_namespace``."""
    sa, runs, serving = run_service_account(cluster), cluster.namespace, cluster.serving_namespace
    subjects = [{"kind": "ServiceAccount", "name": sa, "namespace": runs}]
    if (runs, sa) != KFP_DEFAULT and runs == KFP_DEFAULT[0]:
        subjects.append({"kind": "ServiceAccount", "name": KFP_DEFAULT[1], "namespace": runs})
    namespace_role = f"{DEPLOYER}-namespace-{serving}"
    objects: list[dict[str, Any]] = []
    if sa == OWN_SERVICE_ACCOUNT:
        objects += [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(sa, runs),
             "automountServiceAccountToken": True},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(RUNNER, runs),
             "rules": RUNNER_RULES},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(RUNNER, runs),
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": RUNNER},
             "subjects": [subjects[0]]},
        ]
    objects += [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(DEPLOYER, serving),
         "rules": deployer_rules(cluster, manifests=manifests, kubectl=kubectl)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(DEPLOYER, serving),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": DEPLOYER},
         "subjects": subjects},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": _meta(namespace_role),
         "rules": [{"apiGroups": [""], "resources": ["namespaces"], "resourceNames": [serving],
                    "verbs": list(kubernetes.NAMESPACE_VERBS)}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": _meta(namespace_role),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": namespace_role},
         "subjects": subjects},
    ]
    return objects


class _Dumper(yaml.SafeDumper):
    """Block sequences indented under their key, lists of scalars on one line: the house style
    that yamllint checks in manifests/."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)


def _list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    scalars = all(isinstance(item, (str, int, float, bool)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=scalars)


_Dumper.add_representer(list, _list)


def render_yaml(cluster: ClusterConfig, **kwargs: Any) -> str:
    return yaml.dump_all(render(cluster, **kwargs), Dumper=_Dumper, sort_keys=False, explicit_start=True)
