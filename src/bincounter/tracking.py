"""MLflow access in one place: which store, which experiment, one run per stage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from bincounter.paths import default_tracking_uri


def configure(tracking_uri: str | None = None, experiment: str = "bincounter") -> str:
    """Point mlflow at the store (explicit URI, $MLFLOW_TRACKING_URI, or local SQLite)."""
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        try:
            mlflow.create_experiment(experiment, artifact_location=local_artifact_root(uri))
        except mlflow.exceptions.MlflowException:
            pass  # another stage created it a moment ago
    mlflow.set_experiment(experiment)
    return uri


class TrackingServerError(RuntimeError):
    """The tracking store does not answer, or refuses these credentials."""


def check_server(tracking_uri: str | None = None) -> str:
    """Ask the store one cheap question (an experiment search) and return its URI; raise
    :class:`TrackingServerError` naming the URI, the credentials variables and the cause."""
    import os

    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # MlflowException, requests' errors: the message says which
        auth = [k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_TOKEN") if os.environ.get(k)]
        raise TrackingServerError(
            f"the MLflow tracking store {uri} does not answer a search with this task's credentials "
            f"({', '.join(auth) or 'no MLFLOW_TRACKING_* credentials'} set): {str(exc)[:500]}") from exc
    return uri


def local_artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database file, not in whatever folder the
    process happened to start in (MLflow's default, ./mlruns)."""
    if not uri.startswith("sqlite:///"):
        return None  # a tracking server decides for itself
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "mlartifacts").resolve().as_uri()


@contextlib.contextmanager
def stage_run(stage: str, params: dict | None = None, *, tracking_uri: str | None = None,
              experiment: str = "bincounter", run_id: str | None = None,
              system_metrics: bool = False) -> Iterator[object]:
    """An MLflow run for one stage, tagged with the stage and the pipeline run when known.

    ``run_id`` resumes an existing run (a restarted training keeps one history).
    """
    import mlflow

    configure(tracking_uri, experiment)
    tags = {"bincounter.stage": stage}
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else stage, tags=tags,
                          log_system_metrics=system_metrics) as run:
        if params:
            # Each stage logs under its own prefix, so stages sharing a run never collide; a
            # resumed run re-logs identical values, which MLflow accepts.
            mlflow.log_params({k: _param(v) for k, v in params.items()})
        yield run


def _param(value: object) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics to the active run, if there is one (tests may run without)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        mlflow.log_metrics(numeric, step=step)


def log_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    for p in paths:
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path=artifact_path)
        elif p.exists():
            mlflow.log_artifact(str(p), artifact_path=artifact_path)
