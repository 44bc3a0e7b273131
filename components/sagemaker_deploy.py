from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sagemaker_deploy(registration: Input[Artifact], endpoint: Output[Artifact], sagemaker: dict, model_uri: str,
                     tracking_uri: str):
    """Host the registry's champion (or ``model_uri``) on a SageMaker endpoint: model, endpoint
    config, create or update, wait until InService; a failed update is rolled back to the
    previous endpoint config and fails this step. ``sagemaker`` is a ``SageMakerConfig``; the
    endpoint loads the model from ``tracking_uri``, the run's MLflow server.
    """
    from bincounter.sagemaker import steps
    from bincounter.config import SageMakerConfig, SageMakerHostingConfig

    cfg = SageMakerHostingConfig(sagemaker=SageMakerConfig.model_validate(sagemaker), model_uri=model_uri,
                                 tracking_uri=tracking_uri or None)
    endpoint.metadata.update(steps.deploy(cfg, registration.metadata["champion_uri"]))
