from kfp import dsl
from typing import Optional

from kfp.dsl import HTML, Artifact, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    data: Input[Dataset],
    model: Output[Model],
    curves: Output[HTML],
    backbone: str,
    pretrained: str,
    head: str,
    loss: str,
    image_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    freeze_backbone: bool,
    freeze_early: int,
    early_stopping_patience: int,
    workers: int,
    seed: int,
    tracking_uri: str,
    experiment: str,
    tuned: Optional[Input[Artifact]] = None,
):
    """Train a counter on the packed shards (GPU when there is one), logging to MLflow.

    With ``tuned`` (the tune stage's output), the searched settings come from its best trial.
    A rerun on the same output resumes from the last epoch's checkpoint. The model artifact
    carries the MLflow run id for the stages after it.
    """
    from bincounter import launch
    from bincounter.config import TrainConfig

    cfg = TrainConfig(backbone=backbone, pretrained=pretrained, head=head, loss=loss, image_size=image_size,
                      epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      freeze_backbone=freeze_backbone, freeze_early=freeze_early,
                      early_stopping_patience=early_stopping_patience,
                      workers=workers, seed=seed)
    if tuned is not None:  # the search's best settings replace the ones it varied
        from bincounter.tune import apply_best

        cfg = apply_best(cfg, tuned.path)
    model.metadata.update(launch.train(cfg, data.path, model.path, tracking_uri=tracking_uri or None,
                                       experiment=experiment, curves_html=curves.path))
