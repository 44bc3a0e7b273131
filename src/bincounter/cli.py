"""``bincounter``: one subcommand per stage, serving and prediction; the pipelines and the demo add
their own (``pipeline ...``; ``demo``, ``synth``, ``s3-server``) through the entry point group
``bincounter.commands``, so the library imports neither.

Every option comes from the typed configs in ``bincounter.config`` (via tyro), so ``--help``
shows each stage's parameters with their defaults and descriptions.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import tyro

from bincounter.config import (
    AuditConfig,
    DeployConfig,
    ErrorRateConfig,
    EvaluateConfig,
    IngestConfig,
    PreprocessConfig,
    RegisterConfig,
    ReviewConfig,
    ReviewQueueConfig,
    ServeConfig,
    TrainConfig,
)

Flat = tyro.conf.arg(name="")  # a stage's fields appear as top-level options


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def ingest(out: Path, cfg: Annotated[IngestConfig, Flat] = IngestConfig()) -> None:
    """Fetch photos and metadata from s3://aft-vbi-pds (or any endpoint/folder); resumable."""
    from bincounter import launch

    _print(launch.ingest(cfg, str(out)))


def preprocess(input: Path, out: Path, cfg: Annotated[PreprocessConfig, Flat] = PreprocessConfig()) -> None:
    """Validate, clean, split, resize and pack an ingested folder into webdataset shards."""
    from bincounter import launch

    _print(launch.preprocess(cfg, str(input), str(out)))


def train(data: str, out: Path, cfg: Annotated[TrainConfig, Flat] = TrainConfig(),
          tracking_uri: str | None = None, experiment: str = "bincounter") -> None:
    """Train a counter on preprocessed shards (a folder or s3://...); rerun with the same --out to
    resume. Works under torchrun; on a machine with several GPUs it starts one DDP process per GPU
    itself."""
    from bincounter import launch
    from bincounter.training.train import init_distributed

    rank, _ = init_distributed()
    if rank == 0:
        _print(launch.train(cfg, data, str(out), tracking_uri=tracking_uri, experiment=experiment))
    else:  # other ranks train without an MLflow run of their own
        from bincounter.training.train import train as run

        run(cfg, data, out)


def evaluate(model: Path, data: Path, out: Path, cfg: Annotated[EvaluateConfig, Flat] = EvaluateConfig(),
             originals: tuple[Path, ...] = (), tracking_uri: str | None = None, run_id: str | None = None) -> None:
    """Score a trained model on the held-out test split; write metrics, plots and a report.

    Args:
        originals: The ingest output folder(s) the data was made from: the test photos are then
            scored as the model server answers them (the headline figures), the shards beside.
    """
    from bincounter import launch

    out_ = launch.evaluate(cfg, str(model), str(data), str(out), originals=[str(p) for p in originals],
                           tracking_uri=tracking_uri, run_id=run_id)
    _print({**out_["summary"], **out_["comparison"], "path": out_["path"]})


def compare(candidate: tuple[Path, ...], baseline: tuple[Path, ...]) -> None:
    """Compare two models on the same test photos: accuracy, RMSE, and McNemar's exact test on the
    photos exactly one of them counted right, pooled over seeds.

    Args:
        candidate: Evaluation output folders (or predictions.csv) of the model tried, one per seed.
        baseline: The same for the model it is compared against, in the same seed order.
    """
    from bincounter.evaluation.compare import compare as run

    _print(run(list(candidate), list(baseline)).to_dict())


def register(model: Path, evaluation: Path, data: Path, cfg: Annotated[RegisterConfig, Flat] = RegisterConfig(),
             run_id: str | None = None) -> None:
    """Register a model version in MLflow as 'challenger'; promote to 'champion' if it wins."""
    from bincounter import launch

    marker = model / "mlflow_run_id"
    run_id = run_id or (marker.read_text().strip() if marker.exists() else None)
    _print(launch.register(cfg, str(model), str(evaluation), str(data), run_id=run_id))


def deploy(cfg: Annotated[DeployConfig, Flat] = DeployConfig(), name: str = "bincounter") -> None:
    """Deploy a registered model: local server, Kubernetes (kubectl), KServe or SageMaker."""
    from bincounter import launch

    _print(launch.deploy(cfg, name=name))


def undeploy(name: str = "bincounter") -> None:
    """Stop a local deployment started by 'deploy'."""
    from bincounter.deploy import stop

    _print({"stopped": stop("local", name)})


def serve(cfg: Annotated[ServeConfig, Flat] = ServeConfig()) -> None:
    """Serve a model in the foreground (the container runs the same server as
    ``python -m bincounter.serving``, which also reads $MODEL_URI, $PORT and $BINCOUNTER_SERVE_*)."""
    from bincounter.serving.app import run

    sys.exit(run(cfg))


def predict(images: tuple[Path, ...], /, model_uri: str = "models:/bincounter@champion",
            tracking_uri: str | None = None) -> None:
    """Count the items in local images with a registered model."""
    import mlflow
    import pandas as pd

    from bincounter import tracking

    tracking.configure(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    frame = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    for path, row in zip(images, frame.to_dict("records")):
        print(f"{path}\tcount={row['count']}\tconfidence={row['confidence']:.2f}\texpected={row['expected_count']:.2f}")


def audit(source: Annotated[str, tyro.conf.arg(metavar="SOURCE", help="s3://bucket[/prefix] or a folder.")], /,
          out: Path, cfg: Annotated[AuditConfig, Flat] = AuditConfig()) -> None:
    """Count every bin of a pod (s3://bucket[/prefix] or a folder, bucket layout), compare with the
    expected counts, and write audit.csv, audit.parquet and report.html to --out; rerun with the
    same --out to resume. SOURCE sets the source's uri (--source.* set its endpoint and signing)."""
    from bincounter import launch

    cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"uri": source})})
    _print(launch.audit(AuditConfig.model_validate(cfg.model_dump()), str(out)))


def error_rate(reviewed: Annotated[Path, tyro.conf.arg(metavar="CSV", help="id,expected,counted: the record's "
                                                 "count and the count a person found, for a random sample of bins.")], /,
               cfg: Annotated[ErrorRateConfig, Flat] = ErrorRateConfig()) -> None:
    """Estimate the inventory's error rate (and how wrong its wrong records are) from bins people
    counted, for --verdict.error-rate and --verdict.off-by-one-share. The bins must be a random
    sample: bins counted because they were flagged are wrong far more often than the rest."""
    from bincounter.audit.error_rate import estimate

    found = estimate(reviewed, cfg)
    advice = {}
    if found.high is not None:
        advice = {"suggested": f"--verdict.error-rate {found.error_rate:.3g} (the estimate); {found.high:.3g} is the "
                               "interval's upper end, safer when wrong bins must not pass" if found.wrong else
                  f"--verdict.error-rate {found.high:.3g} (no wrong record among these: the interval's upper end)"}
        if found.off_by_one_share is not None:
            advice["suggested"] += (f"; --verdict.off-by-one-share {found.off_by_one_share:.2f} "
                                    f"--verdict.off-by-more-share {found.off_by_more_share:.2f}")
    _print({**found.to_dict(), **advice})


def review_queue(audit: Annotated[Path, tyro.conf.arg(metavar="AUDIT", help="an audit's output folder (or its "
                                                  "audit.csv)")], /,
                 out: Annotated[Path, tyro.conf.arg(help="where to write queue.csv")] = Path("queue.csv"),
                 cfg: Annotated[ReviewQueueConfig, Flat] = ReviewQueueConfig()) -> None:
    """The bins of an audit people should count first: of the unsure and flagged ones, those the model
    is least sure of, up to a day's budget (queue.csv: position, id, uncertainty and the model that
    asked; no counts in it, so whoever counts is not anchored). With --reviews.uri, earlier answers
    take settled bins out and put disputed ones first."""
    from bincounter.audit import review_queue as rq

    queue = rq.build(audit, cfg)
    path = rq.write(queue, out)
    _print({"queue": str(path), "bins": len(queue.entries), "candidates": queue.candidates, "skipped": queue.skipped,
            "skipped_examples": queue.skipped_examples})


def review(queue: Annotated[Path, tyro.conf.arg(metavar="QUEUE", help="a queue.csv (bincounter review-queue)")],
           source: Annotated[str, tyro.conf.arg(metavar="SOURCE", help="the bins: s3://bucket[/prefix] or a folder, "
                                                "bucket layout; answers go to its reviews/")], /,
           cfg: Annotated[ReviewConfig, Flat] = ReviewConfig()) -> None:
    """Serve the review page: people count the queue's bins one at a time (photo, number pad,
    keyboard), never shown the model's or the record's count. Each answer is stored in
    SOURCE/reviews/<id>.json with who, when, the photo's sha256 and the model that asked.
    Signing in: --tokens FILE (bincounter review-token) or --identity-header behind a proxy."""
    from bincounter.review.app import run

    cfg = ReviewConfig.model_validate({**cfg.model_dump(), "source": {**cfg.source.model_dump(), "uri": source}})
    run(cfg, queue)


def review_token(name: Annotated[str, tyro.conf.arg(metavar="NAME", help="the reviewer's name (letters, digits, "
                                                    ". _ @ + -)")], /,
                 tokens: Path = Path("reviewers.tokens")) -> None:
    """Make a reviewer's token for the review page (replacing any they had) and print it once: the
    file keeps only its sha256, so keep the token where the reviewer can find it."""
    from bincounter.review.auth import add_reviewer

    _print({"reviewer": name, "token": add_reviewer(tokens, name), "tokens": str(tokens)})


COMMANDS = {
    "ingest": ingest, "preprocess": preprocess, "train": train, "evaluate": evaluate, "compare": compare,
    "register": register, "deploy": deploy, "undeploy": undeploy, "serve": serve, "predict": predict, "audit": audit,
    "error-rate": error_rate, "review-queue": review_queue, "review": review, "review-token": review_token,
}
# Commands other installed packages add, and how to get them when they are missing.
PLUGIN_GROUP = "bincounter.commands"
PLUGIN_HINTS = {
    "pipeline": "the pipelines package, which installs with bincounter itself: reinstall bincounter",
    **{name: "the demo package: pip install ./demo (bincounter-demo; make venv installs it)"
       for name in ("demo", "synth", "s3-server")},
}


def commands() -> dict:
    """The library's commands and those registered in the entry point group ``bincounter.commands``
    (the pipelines' ``pipeline ...``, the demo's ``demo``, ``synth`` and ``s3-server``)."""
    from importlib.metadata import entry_points

    found = dict(COMMANDS)
    for entry in entry_points(group=PLUGIN_GROUP):
        found.update(entry.load())
    return found


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    available = commands()
    if args and args[0] in PLUGIN_HINTS and args[0] not in available:
        raise SystemExit(f"bincounter {args[0]} is not installed here; it comes with {PLUGIN_HINTS[args[0]]}")
    groups = {name: sub for name, sub in available.items() if isinstance(sub, dict)}
    # "pipeline run" reads better than one hyphenated word; tyro takes one level of names.
    if len(args) >= 2 and args[0] in groups and args[1] in groups[args[0]]:
        args = [f"{args[0]}-{args[1]}", *args[2:]]
    flat = {name: command for name, command in available.items() if not isinstance(command, dict)}
    flat.update({f"{group}-{name}": command for group, sub in groups.items() for name, command in sub.items()})
    tyro.extras.subcommand_cli_from_dict(flat, args=args, prog="bincounter",
                                         description="Count the items in warehouse bin photos.")


if __name__ == "__main__":
    main()
