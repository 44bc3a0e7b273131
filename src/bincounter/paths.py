"""Where local state lives (MLflow store, deployments, demo data).

Resolved on call, never at import, so importing the package has no side effects.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The project's working folder: $BINCOUNTER_HOME, else ./.bincounter."""
    return Path(os.environ.get("BINCOUNTER_HOME", Path.cwd() / ".bincounter")).resolve()


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store in the working folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    path = home() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def deployments_dir() -> Path:
    return home() / "deployments"
