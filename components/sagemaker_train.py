from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sagemaker_train(data: Input[Dataset], model: Output[Model], curves: Output[HTML], config: dict):
    """Train on SageMaker: upload the packed shards to S3, run a (spot) training job of the
    project's image on them, poll it to the end, log its metrics to MLflow and unpack its
    model.tar.gz as this step's model. ``config`` is a ``SageMakerTrainingConfig`` as JSON
    (``model_dump(mode="json")``): the training settings, the account and the MLflow run.
    """
    from bincounter import sagemaker_launch
    from bincounter.config import SageMakerTrainingConfig

    cfg = SageMakerTrainingConfig.model_validate(config)
    model.metadata.update(sagemaker_launch.train(cfg, data.path, model.path, curves_html=curves.path))
