from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(data: Input[Dataset], model: Output[Model], curves: Output[HTML], config: dict, tracking_uri: str,
          experiment: str, tuned: Optional[Input[Artifact]] = None):
    """Train a counter on the packed shards (GPU when there is one), logging to MLflow.

    ``config`` is a ``TrainConfig``; with ``tuned`` (the tune stage's output) the searched
    settings come from its best trial. A rerun on the same output resumes from the last
    epoch's checkpoint. The model artifact carries the MLflow run id for the stages after it.
    """
    from bincounter import launch
    from bincounter.config import TrainConfig

    cfg = TrainConfig.model_validate(config)
    model.metadata["config"] = cfg.model_dump(mode="json")
    model.metadata.update(launch.train(cfg, data.path, model.path, tracking_uri=tracking_uri or None,
                                       experiment=experiment, curves_html=curves.path,
                                       tuned_dir=tuned.path if tuned is not None else None))
