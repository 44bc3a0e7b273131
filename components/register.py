from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(model: Input[Model], results: Input[Dataset], data: Input[Dataset], registration: Output[Artifact],
             config: dict, pipeline_run_id: str, tracking_uri: str) -> str:
    """Log the serving pyfunc, register a version as ``challenger``, and promote it to
    ``champion`` only if it beats the current champion on the same test photos. ``config`` is a
    ``RegisterConfig`` (its own ``tracking_uri``, when set, wins over the run's). ``registration``
    keeps the gate's scores and the smoke photos the deploy step asks the new pods about. Returns
    the champion's URI."""
    from bincounter import launch
    from bincounter.config import RegisterConfig

    cfg = RegisterConfig.model_validate(config)
    registration.metadata["config"] = cfg.model_dump(mode="json")
    if cfg.tracking_uri is None and tracking_uri:
        cfg = cfg.model_copy(update={"tracking_uri": tracking_uri})
    out = launch.register(cfg, model.path, results.path, data.path, run_id=model.metadata.get("mlflow_run_id"),
                          pipeline_run_id=pipeline_run_id, out_dir=registration.path)
    registration.metadata.update(out)
    return out["champion_uri"]
