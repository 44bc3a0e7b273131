from kfp import dsl
from kfp.dsl import Artifact, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def check(findings: Output[Artifact], deploy: dict, deploy_enabled: bool, tracking_uri: str):
    """Before any work, what would otherwise fail hours later: the tracking server answers with
    the task's credentials; with deploy enabled, the deploy step can do its work (for Kubernetes
    and KServe: kubectl in the image, the manifests render for ``deploy``, the service account may
    apply them in the serving namespace). ``deploy`` is a ``DeployConfig``. Never retried."""
    from bincounter import launch
    from bincounter.config import DeployConfig

    cfg = DeployConfig.model_validate(deploy)
    findings.metadata.update(launch.check(cfg if deploy_enabled else None, tracking_uri=tracking_uri or None))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sagemaker_check(findings: Output[Artifact], sagemaker: dict, deploy_enabled: bool, tracking_uri: str):
    """The SageMaker variant's check before any work: the tracking server answers, the account's
    settings are complete for a training job (role, bucket, training image) and, with hosting
    enabled, for an endpoint (serving image, an http(s) tracking server). Never retried."""
    from bincounter import launch
    from bincounter.config import SageMakerConfig

    cfg = SageMakerConfig.model_validate(sagemaker)
    findings.metadata.update(launch.check_sagemaker(cfg, deploy_enabled=deploy_enabled,
                                                    tracking_uri=tracking_uri or None))
