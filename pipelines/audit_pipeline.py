"""The audit pipeline: one audit task, made for recurring runs (every shift, every night).
Wiring only; its one parameter is the typed ``AuditConfig`` as a dict, defaults included. On a
cluster the task runs the cluster's image with its secrets, retries and resources, and logs to the
cluster's tracking server (``pipelines.cluster``)."""


from pathlib import Path

from kfp import dsl

from bincounter.config import AuditConfig, ClusterConfig, check_tracking_server
from components.audit import audit


def for_cluster(cfg: AuditConfig, cluster: ClusterConfig) -> AuditConfig:
    """``cfg`` as a pod runs it: its tracking store is the cluster's server unless it names a server
    of its own; a pod-local store (lost with the pod) is refused."""
    if cfg.tracking_uri is None:
        return cfg.model_copy(update={"tracking_uri": cluster.tracking_uri})
    check_tracking_server(cfg.tracking_uri, "--tracking-uri")
    return cfg


def default_config(cfg: AuditConfig) -> dict:
    """``cfg`` as the pipeline's default: KFP cannot compile a None in a default, and a field left
    out validates to its default (None) again."""
    return cfg.model_dump(mode="json", exclude_none=True)


def make_audit_pipeline(cfg: AuditConfig | None = None, cluster: ClusterConfig | None = None):
    """Build the audit pipeline; ``config`` defaults to ``cfg`` (``AuditConfig()``), made for
    ``cluster`` (its tracking server, image and task settings)."""
    cluster = cluster or ClusterConfig()
    default = default_config(for_cluster(cfg or AuditConfig(), cluster))

    @dsl.pipeline(name="bincounter-audit",
                  description="Count every bin of a pod, flag mismatches with the inventory, report for a person.")
    def audit_pipeline(config: dict = default):
        task = audit(config=config)
        # Every run must count the photos as they are now: never reuse an earlier run's answer.
        task.set_caching_options(False)
        from pipelines.cluster import configure

        configure([task], cluster)

    return audit_pipeline


def compile_audit_pipeline(path: str | Path, cfg: AuditConfig | None = None, cluster: ClusterConfig | None = None) -> Path:
    """Write the audit pipeline's IR YAML (upload it, or schedule it as a recurring run)."""
    from pipelines.runner import compile_for

    cluster = cluster or ClusterConfig()
    return compile_for(make_audit_pipeline(cfg, cluster), path, cluster)
