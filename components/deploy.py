from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy(
    registration: Input[Artifact],
    endpoint: Output[Artifact],
    model_uri: str,
    target: str,
    image: str,
    namespace: str,
    port: int,
    dry_run: bool,
):
    """Serve ``model_uri`` (default: the registry's champion) on a local HTTP server,
    Kubernetes (kubectl), KServe or a SageMaker endpoint."""
    from bincounter import launch
    from bincounter.config import DeployConfig

    cfg = DeployConfig(target=target, model_uri=model_uri or registration.metadata["champion_uri"], image=image,
                       namespace=namespace, port=port, dry_run=dry_run)
    endpoint.metadata.update(launch.deploy(cfg))
