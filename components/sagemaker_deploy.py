from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sagemaker_deploy(registration: Input[Artifact], endpoint: Output[Artifact], config: dict):
    """Host the registry's champion (or ``config["model_uri"]``) on a SageMaker endpoint:
    model, endpoint config, create or update, wait until InService; a failed update is rolled
    back to the previous endpoint config and fails this step. ``config`` is a
    ``SageMakerHostingConfig`` as JSON (``model_dump(mode="json")``).
    """
    from bincounter import sagemaker_launch
    from bincounter.config import SageMakerHostingConfig

    cfg = SageMakerHostingConfig.model_validate(config)
    endpoint.metadata.update(sagemaker_launch.deploy(cfg, registration.metadata["champion_uri"]))
