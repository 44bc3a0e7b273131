from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    model: Input[Model],
    results: Input[Dataset],
    data: Input[Dataset],
    registration: Output[Artifact],
    model_name: str,
    metric: str,
    min_improvement: float,
    pipeline_run_id: str,
    tracking_uri: str,
    experiment: str,
) -> str:
    """Log the serving pyfunc, register a version as ``challenger``, and promote it to
    ``champion`` only if it beats the current champion. Returns the champion's URI."""
    from bincounter import launch
    from bincounter.config import RegisterConfig

    cfg = RegisterConfig(model_name=model_name, metric=metric, min_improvement=min_improvement,
                         tracking_uri=tracking_uri or None, experiment=experiment)
    out = launch.register(cfg, model.path, results.path, data.path, run_id=model.metadata.get("mlflow_run_id"),
                          pipeline_run_id=pipeline_run_id)
    registration.metadata.update(out)
    return out["champion_uri"]
