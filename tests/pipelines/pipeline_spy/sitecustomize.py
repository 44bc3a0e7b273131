"""Test spy for the pipeline's wiring (tests/pipelines/test_pipeline.py puts this folder on PYTHONPATH).

With $BINCOUNTER_SPY_DIR set, every KFP component subprocess starts with ``bincounter.launch``'s
stage functions replaced by recorders: each writes the validated config (and the run-level
keyword arguments) its component handed over, and returns just enough for the next component.
The components, their struct parameters and kfp's local runner stay real; only the work is skipped.
"""

import json
import os
import uuid

_DIR = os.environ.get("BINCOUNTER_SPY_DIR")

_RESULTS = {
    "check": {},
    "ingest": {},
    "preprocess": {},
    "merge_shards": {},
    "tune": {"tuned": False},
    "train": {"mlflow_run_id": "spy-run"},
    "evaluate": {"summary": {"accuracy": 0.5}, "comparison": {"shards_accuracy": 0.5}, "verdicts": {"verdict_flag_precision": 1.0},
                 "path": "served",
                 "class_names": ["0", "1"], "confusion_matrix": [[1, 0], [0, 1]], "reviewed": {"test_reviewed_photos": 0.0}},
    "register": {"champion_uri": "models:/spy@champion"},
    "deploy": {},
}


def _recorder(stage):
    def record(cfg, *args, **kwargs):
        entry = {"stage": stage, "config": cfg.model_dump(mode="json") if cfg is not None else None,
                 "kwargs": {k: v for k, v in kwargs.items()
                            if isinstance(v, (str, int, float, bool, type(None)))
                            or (isinstance(v, list) and all(isinstance(x, str) for x in v))}}
        if stage == "tune":
            entry["train_config"] = args[0].model_dump(mode="json")
        with open(os.path.join(_DIR, f"{stage}-{uuid.uuid4().hex}.json"), "w") as f:
            json.dump(entry, f)
        return dict(_RESULTS[stage])

    return record


if _DIR:
    from bincounter import launch

    for _stage in _RESULTS:
        if hasattr(launch, _stage):
            setattr(launch, _stage, _recorder(_stage))
