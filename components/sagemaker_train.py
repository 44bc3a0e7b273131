from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sagemaker_train(data: Input[Dataset], model: Output[Model], curves: Output[HTML], config: dict, sagemaker: dict,
                    tracking_uri: str, experiment: str):
    """Train on SageMaker: upload the packed shards to S3, run a (spot) training job of the
    project's image on them, poll it to the end, log its metrics to MLflow and unpack its
    model.tar.gz as this step's model. ``config`` is a ``TrainConfig``, ``sagemaker`` a
    ``SageMakerConfig`` (the account, instances and limits).
    """
    from bincounter.sagemaker import steps
    from bincounter.config import SageMakerConfig, SageMakerTrainingConfig, TrainConfig

    cfg = SageMakerTrainingConfig(train=TrainConfig.model_validate(config),
                                  sagemaker=SageMakerConfig.model_validate(sagemaker),
                                  tracking_uri=tracking_uri or None, experiment=experiment)
    model.metadata["config"] = cfg.train.model_dump(mode="json")
    model.metadata.update(steps.train(cfg, data.path, model.path, curves_html=curves.path))
