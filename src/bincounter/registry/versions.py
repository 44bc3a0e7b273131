"""Pinning: a registry reference that can move (``models:/bincounter@champion``, ``/latest``, a
stage) resolved once to the version it names now (``models:/bincounter/7``), with that version's
training run and the digest of its served files. Whatever runs a model (a Deployment, an
InferenceService, a SageMaker model, an audit) names the pinned version, so a restart or a
rollback loads the same model and nothing says "champion" where it means "v7"."""

from __future__ import annotations

import re
from dataclasses import dataclass

# models:/<name>@<alias>, models:/<name>/<version or stage or latest>
_MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<ref>[^/]+))/?$")
ANNOTATION_PREFIX = "bincounter.dev/model-"


@dataclass(frozen=True)
class Pinned:
    """A model URI as deployments should name it."""

    uri: str  # models:/<name>/<version>, or the URI as given when it names no registry version
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    sha256: str | None = None

    def labels(self) -> dict[str, str]:
        """What a deployment records beside the URI (Kubernetes annotations, SageMaker tags)."""
        values = {"uri": self.uri, "version": self.version, "run-id": self.run_id, "sha256": self.sha256}
        return {ANNOTATION_PREFIX + k: v for k, v in values.items() if v}


def pin(model_uri: str, client=None) -> Pinned:
    """``model_uri`` resolved to the registry version it names now. URIs that name no registered
    model (a folder, ``runs:/``, ``s3://``) come back as they are."""
    match = _MODELS.match(model_uri)
    if not match:
        return Pinned(uri=model_uri)
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    name, alias, ref = match["name"], match["alias"], match["ref"]
    if alias:
        version = client.get_model_version_by_alias(name, alias)
    elif ref.isdigit():
        version = client.get_model_version(name, ref)
    else:  # "latest" or a stage name
        found = client.get_latest_versions(name, stages=None if ref == "latest" else [ref])
        if not found:
            raise LookupError(f"{model_uri} names no version of {name!r}")
        version = max(found, key=lambda v: int(v.version))
    return Pinned(uri=f"models:/{name}/{version.version}", name=name, version=str(version.version),
                  run_id=version.run_id or version.tags.get("lineage.training_run_id"),
                  sha256=version.tags.get("model.sha256"))
