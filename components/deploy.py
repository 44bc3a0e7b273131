from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy(registration: Input[Artifact], endpoint: Output[Artifact], config: dict, tracking_uri: str):
    """Serve the model on a local HTTP server, Kubernetes (kubectl), KServe or a SageMaker
    endpoint. ``config`` is a ``DeployConfig``; its default ``model_uri`` stands for the
    champion of the model name this run registered. On Kubernetes and KServe the pods load the
    model from ``tracking_uri``, the run's MLflow server."""
    from bincounter import launch
    from bincounter.config import DeployConfig

    cfg = DeployConfig.model_validate(config)
    endpoint.metadata["config"] = cfg.model_dump(mode="json")
    if cfg.model_uri == DeployConfig.model_fields["model_uri"].default:
        cfg = cfg.model_copy(update={"model_uri": registration.metadata["champion_uri"]})
    from pathlib import Path

    smoke = Path(registration.path) / "smoke"
    endpoint.metadata.update(launch.deploy(cfg, tracking_uri=tracking_uri or None,
                                           smoke_dir=str(smoke) if smoke.is_dir() else None))
