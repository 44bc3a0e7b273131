"""The audit pipeline: one audit task, made for recurring runs (every shift, every night).
Wiring only; its one parameter is the typed ``AuditConfig`` as a dict, defaults included."""

from pathlib import Path

from kfp import dsl

from bincounter.config import AuditConfig
from components.audit import audit


def default_config() -> dict:
    """``AuditConfig()`` as the pipeline's default: KFP cannot compile a None in a default, and
    a field left out validates to its default (None) again."""
    return AuditConfig().model_dump(mode="json", exclude_none=True)


def make_audit_pipeline():
    """Build the audit pipeline; ``config`` defaults to ``AuditConfig()``'s values."""

    @dsl.pipeline(name="bincounter-audit",
                  description="Count every bin of a pod, flag mismatches with the inventory, report for a person.")
    def audit_pipeline(config: dict = default_config()):
        task = audit(config=config)
        # Every run must count the photos as they are now: never reuse an earlier run's answer.
        task.set_caching_options(False)
        task.set_cpu_request("2").set_memory_request("4G")

    return audit_pipeline


def compile_audit_pipeline(path: str | Path) -> Path:
    """Write the audit pipeline's IR YAML (upload it, or schedule it as a recurring run)."""
    from kfp import compiler

    compiler.Compiler().compile(make_audit_pipeline(), str(path))
    return Path(path)
