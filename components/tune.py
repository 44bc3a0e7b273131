from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune(data: Input[Dataset], best: Output[Artifact], config: dict, train_config: dict, tracking_uri: str,
         experiment: str):
    """Random search over the training settings, one MLflow child run per trial.

    ``config`` is a ``TuneConfig`` (``trials`` 0 switches tuning off: an empty ``best``,
    which the train task ignores); ``train_config`` the ``TrainConfig`` the trials start from.
    The ``best`` artifact is the search folder; its metadata holds the best settings.
    """
    from bincounter import launch
    from bincounter.config import TrainConfig, TuneConfig

    cfg = TuneConfig.model_validate(config)
    base = TrainConfig.model_validate(train_config)
    best.metadata["config"] = cfg.model_dump(mode="json")
    best.metadata.update(launch.tune(cfg, base, data.path, best.path, tracking_uri=tracking_uri or None,
                                     experiment=experiment))
