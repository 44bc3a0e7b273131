"""Deployment targets: local process, Kubernetes, KServe, SageMaker.

Each target is a module ``bincounter.deploy.<target>`` with ``deploy(cfg, **kwargs) -> dict``
and ``check(cfg, **kwargs) -> dict`` (what ``deploy`` needs, checked before a pipeline does any
work), and optionally ``stop`` and ``status``. They are imported on demand, so the local target
works without the Kubernetes or AWS clients installed. ``rbac`` renders what a cluster run needs.

May import: ``bincounter.config`` and the foundation modules only (a target names the model it
serves by URI; it never loads one).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from bincounter.config import DeployConfig

TARGETS = ("local", "kubernetes", "kserve", "sagemaker")


def _target(target: str) -> ModuleType:
    if target not in TARGETS:
        raise ValueError(f"unknown deployment target {target!r}; choose one of {', '.join(TARGETS)}")
    return importlib.import_module(f"{__name__}.{target}")


def deploy(cfg: DeployConfig, **kwargs: Any) -> dict[str, Any]:
    """Deploy ``cfg.model_uri`` to ``cfg.target``; keyword arguments go to the target's ``deploy``."""
    return _target(cfg.target).deploy(cfg, **kwargs)


def check(cfg: DeployConfig, **kwargs: Any) -> dict[str, Any]:
    """Whether ``deploy(cfg, **kwargs)`` can do its work, without doing it: raises with the reason."""
    return _target(cfg.target).check(cfg, **kwargs)


def stop(target: str = "local", name: str = "bincounter", **kwargs: Any) -> bool:
    """Stop the deployment ``name`` on ``target``; False if there was nothing to stop."""
    module = _target(target)
    if not hasattr(module, "stop"):
        raise NotImplementedError(f"the {target!r} target has no stop()")
    return module.stop(name, **kwargs)


def status(target: str = "local", name: str = "bincounter", **kwargs: Any) -> dict[str, Any]:
    """What the target knows about the deployment ``name``."""
    module = _target(target)
    if not hasattr(module, "status"):
        raise NotImplementedError(f"the {target!r} target has no status()")
    return module.status(name, **kwargs)
