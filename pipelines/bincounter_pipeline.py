"""The bincounter pipeline: check -> ingest -> preprocess -> [tune] -> train -> evaluate -> register -> deploy.

Wiring only. Each stage takes ONE struct parameter, its typed config's ``params()``. The
pipeline's parameters are built from ``PipelineConfig`` by :func:`parameters` (the stages the
pipeline has, plus the run-level ``shards``, ``deploy_enabled``, ``tracking_uri`` and
``experiment``), and ``pipelines.runner.arguments`` passes exactly those: no field is listed by
hand. Task placement (images, GPUs, secrets, caching, resources) is set on the tasks, for a
cluster, in ``pipelines.cluster``; never inside components.
"""


import inspect
from collections.abc import Callable
from typing import Any, Optional

from kfp import dsl
from kfp.dsl import Dataset

from bincounter.config import KFP_BACKENDS, STAGES, ClusterConfig, PipelineConfig, version_tuple
from components.check import check as check_op
from components.deploy import deploy as deploy_op
from components.evaluate import evaluate as evaluate_op
from components.ingest import ingest as ingest_op
from components.preprocess import merge_shards as merge_op
from components.preprocess import preprocess as preprocess_op
from components.preprocess import shard_indices as shard_indices_op
from components.register import register as register_op
from components.train import train as train_op
from components.tune import tune as tune_op

NEWEST = KFP_BACKENDS[-1]
# dsl.Collected (merge_shards' fan-in) runs on KFP backends from 2.14 on.
COLLECTED_SINCE = "2.14"


def shards_supported(backend: str) -> bool:
    return version_tuple(backend) >= version_tuple(COLLECTED_SINCE)


def stages_of(cfg: PipelineConfig) -> tuple[str, ...]:
    """The stages this pipeline runs: a search only when it has trials, so a pipeline compiled
    without one holds no tune task (and no GPU for it)."""
    return tuple(s for s in STAGES if s != "tune" or cfg.tune.trials > 0)


def parameters(cfg: PipelineConfig, tracking_uri: str = "", *, backend: str = NEWEST) -> dict[str, Any]:
    """The pipeline's parameters with ``cfg`` as their defaults, in signature order: one struct per
    stage it runs, then ``shards`` (where the backend can merge shards), ``deploy_enabled``,
    ``tracking_uri`` and ``experiment``."""
    params: dict[str, Any] = {stage: getattr(cfg, stage).params() for stage in stages_of(cfg)}
    if shards_supported(backend):
        params["shards"] = cfg.shards
    elif cfg.shards > 1:
        raise ValueError(f"--shards {cfg.shards} needs dsl.Collected, which KFP backends before {COLLECTED_SINCE} "
                         f"cannot run: compile for --cluster.kfp-backend {COLLECTED_SINCE} or newer, or with --shards 1")
    params.update(deploy_enabled=cfg.deploy_enabled, tracking_uri=tracking_uri, experiment=cfg.registry.experiment)
    return params


def with_signature(body: Callable[[dict], None], params: dict[str, Any]) -> Callable:
    """A function whose signature is ``params`` (name: default, annotated with the default's type)
    and which calls ``body`` with the values by name: KFP reads a pipeline's parameters off its
    signature and calls it with one channel per parameter, in order."""

    def pipeline_func(*values):
        return body(dict(zip(params, values)))

    pipeline_func.__signature__ = inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=value, annotation=type(value))
        for name, value in params.items()])
    return pipeline_func


def data_stages(ingest: dict, preprocess: dict, shards=None) -> tuple[dict, Any]:
    """Ingest and preprocess: the tasks by name, and the dataset they make.

    With ``shards`` (a pipeline parameter), fanned out over that many shards of the id space
    (dsl.ParallelFor) and joined by ``merge_shards`` (dsl.Collected); without, one ingest and one
    preprocess, whose output is the dataset (what one shard makes, for backends without
    dsl.Collected)."""
    if shards is None:
        raw = ingest_op(config=ingest, shard=0, shards=1)
        part = preprocess_op(raw=raw.outputs["raw"], config=preprocess)
        return {"ingest": raw, "preprocess": part}, part.outputs["data"]
    plan = shard_indices_op(shards=shards)
    with dsl.ParallelFor(plan.output) as shard:
        raw = ingest_op(config=ingest, shard=shard, shards=shards)
        part = preprocess_op(raw=raw.outputs["raw"], config=preprocess)
    merged = merge_op(parts=dsl.Collected(part.outputs["data"]), config=preprocess)
    return {"shard_indices": plan, "ingest": raw, "preprocess": part, "merge_shards": merged}, merged.outputs["data"]


def evaluate_and_register(model, data, evaluate: dict, registry: dict, tracking_uri, experiment) -> dict:
    """Score ``model`` on ``data``'s test split, then register it (promoted only if it beats the
    champion): the tasks by name. Both pipelines wire these two stages through here. Evaluation
    scores the test photos' originals, which preprocess keeps in ``data``, as the server answers them."""
    scored = evaluate_op(model=model, data=data, config=evaluate, tracking_uri=tracking_uri, experiment=experiment)
    registered = register_op(model=model, results=scored.outputs["results"], data=data, config=registry,
                             pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, tracking_uri=tracking_uri)
    # Registering changes the world outside the pipeline: never cache it.
    registered.set_caching_options(False)
    return {"evaluate": scored, "register": registered}


def uncache_reviewed_ingest(tasks: dict, defaults: PipelineConfig) -> None:
    """With ``--ingest.reviews``, never cache ingest. Call it after ``pipelines.cluster.configure``,
    which sets the data stages' caching from --cluster.cache-data."""
    if defaults.ingest.reviews:
        # People's counts pile up under the same reviews prefix every day while ingest's inputs (its
        # config) stay the same: a cached ingest would hand a scheduled run the last run's labels.
        tasks["ingest"].set_caching_options(False)


def make_pipeline(defaults: Optional[PipelineConfig] = None, cluster: Optional[ClusterConfig] = None,
                  tracking_uri: str = ""):
    """Build the pipeline with ``defaults`` as its parameters' default values; with ``cluster``,
    every task also gets its Kubernetes settings (see ``pipelines.cluster``) and the YAML suits
    ``cluster.kfp_backend``."""
    d = defaults or PipelineConfig()
    params = parameters(d, tracking_uri, backend=cluster.kfp_backend if cluster else NEWEST)

    def body(p: dict) -> None:
        # First, and never retried: what would otherwise fail after hours of training.
        checked = check_op(deploy=p["deploy"], deploy_enabled=p["deploy_enabled"], tracking_uri=p["tracking_uri"])
        checked.set_caching_options(False)
        tasks, data = data_stages(p["ingest"], p["preprocess"], p.get("shards"))
        tasks["check"] = checked
        tuned = None
        if "tune" in p:
            tuned = tune_op(data=data, config=p["tune"], train_config=p["train"], tracking_uri=p["tracking_uri"],
                            experiment=p["experiment"]).after(checked)
            tasks["tune"] = tuned
        trained = train_op(data=data, config=p["train"], tracking_uri=p["tracking_uri"], experiment=p["experiment"],
                           **({"tuned": tuned.outputs["best"]} if tuned is not None else {})).after(checked)
        tasks["train"] = trained
        tasks.update(evaluate_and_register(trained.outputs["model"], data, p["evaluate"], p["registry"],
                                           p["tracking_uri"], p["experiment"]))
        with dsl.If(p["deploy_enabled"] == True):  # noqa: E712 - kfp builds a condition from ==
            served = deploy_op(registration=tasks["register"].outputs["registration"], config=p["deploy"],
                               tracking_uri=p["tracking_uri"])
            # Deploying changes the world outside the pipeline: never cache it.
            served.set_caching_options(False)
            tasks["deploy"] = served
        if cluster is not None:
            from pipelines.cluster import configure

            configure(tasks.values(), cluster)
        uncache_reviewed_ingest(tasks, d)

    return dsl.pipeline(name="bincounter", description="Count items in warehouse bin photos (Amazon Bin Image "
                        "Dataset).")(with_signature(body, params))


def make_data_pipeline(defaults: Optional[PipelineConfig] = None):
    """Only the data stages: the dataset the training would read, as the pipeline's output."""
    d = defaults or PipelineConfig()

    @dsl.pipeline(name="bincounter-data", description="Ingest and preprocess, sharded, into one dataset.")
    def bincounter_data(ingest: dict = d.ingest.params(), preprocess: dict = d.preprocess.params(),
                        shards: int = d.shards) -> Dataset:
        return data_stages(ingest, preprocess, shards)[1]

    return bincounter_data
