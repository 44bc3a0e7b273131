from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune(
    data: Input[Dataset],
    best: Output[Artifact],
    trials: int,
    epochs: int,
    backbones: str,
    tracking_uri: str,
    experiment: str,
):
    """Random search over the training settings, one MLflow child run per trial.

    ``trials`` 0 switches tuning off (an empty ``best``, which the train task ignores);
    ``epochs`` > 0 fixes every trial's epochs (short trials), 0 searches the default choices;
    ``backbones`` is comma-separated, "" for the default choices. The ``best`` artifact is the
    search folder (best.json, trials.jsonl, plot); its metadata holds the best settings.
    """
    from bincounter.config import TrainConfig
    from bincounter.tune import SearchSpace, TuneConfig, launch_tune

    fixed = {}
    if epochs > 0:
        fixed["epochs"] = (epochs,)
    if backbones.strip():
        fixed["backbone"] = tuple(b.strip() for b in backbones.split(",") if b.strip())
    best.metadata.update(launch_tune(TrainConfig(progress=False), SearchSpace(**fixed),
                                     TuneConfig(trials=trials) if trials > 0 else None,
                                     data.path, best.path, tracking_uri=tracking_uri or None,
                                     experiment=experiment))
