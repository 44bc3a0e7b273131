"""The bincounter pipeline: ingest -> preprocess -> tune -> train -> evaluate -> register -> deploy.

Wiring only. Each stage takes ONE struct parameter, its typed config's ``params()``, so the
pipeline's parameters are exactly ``PipelineConfig``'s stages (``config.STAGES``) plus the
run-level ``tracking_uri``, ``experiment`` and ``deploy_enabled``; no field is listed by hand.
Task placement (images, GPUs, secrets, caching, resources) is set on the tasks, for a cluster,
in ``pipelines.cluster``; never inside components.
"""

from typing import Optional

from kfp import dsl
from kfp.dsl import Dataset

from bincounter.config import ClusterConfig, PipelineConfig
from components.deploy import deploy as deploy_op
from components.evaluate import evaluate as evaluate_op
from components.ingest import ingest as ingest_op
from components.preprocess import merge_shards as merge_op
from components.preprocess import preprocess as preprocess_op
from components.preprocess import shard_indices as shard_indices_op
from components.register import register as register_op
from components.train import train as train_op
from components.tune import tune as tune_op


def data_stages(ingest: dict, preprocess: dict, shards) -> dict:
    """Ingest and preprocess fanned out over ``shards`` shards of the id space (dsl.ParallelFor),
    joined by ``merge_shards`` (dsl.Collected): the tasks by name."""
    plan = shard_indices_op(shards=shards)
    with dsl.ParallelFor(plan.output) as shard:
        raw = ingest_op(config=ingest, shard=shard, shards=shards)
        part = preprocess_op(raw=raw.outputs["raw"], config=preprocess)
    merged = merge_op(parts=dsl.Collected(part.outputs["data"]), config=preprocess)
    return {"shard_indices": plan, "ingest": raw, "preprocess": part, "merge_shards": merged}


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


def make_pipeline(defaults: Optional[PipelineConfig] = None, cluster: Optional[ClusterConfig] = None,
                  tracking_uri: str = ""):
    """Build the pipeline with ``defaults`` as its parameters' default values; with ``cluster``,
    every task also gets its Kubernetes settings (see ``pipelines.cluster``)."""
    d = defaults or PipelineConfig()

    @dsl.pipeline(name="bincounter", description="Count items in warehouse bin photos (Amazon Bin Image Dataset).")
    def bincounter_pipeline(
        ingest: dict = d.ingest.params(),
        preprocess: dict = d.preprocess.params(),
        tune: dict = d.tune.params(),
        train: dict = d.train.params(),
        evaluate: dict = d.evaluate.params(),
        registry: dict = d.registry.params(),
        deploy: dict = d.deploy.params(),
        shards: int = d.shards,
        deploy_enabled: bool = d.deploy_enabled,
        tracking_uri: str = tracking_uri,
        experiment: str = d.registry.experiment,
    ):
        tasks = data_stages(ingest, preprocess, shards)
        data = tasks["merge_shards"]
        # Always scheduled: with 0 trials it returns at once. (A dsl.If branch would need
        # dsl.OneOf downstream, which kfp's local runner cannot run.)
        tuned = tune_op(data=data.outputs["data"], config=tune, train_config=train, tracking_uri=tracking_uri,
                        experiment=experiment)
        trained = train_op(data=data.outputs["data"], tuned=tuned.outputs["best"], config=train,
                           tracking_uri=tracking_uri, experiment=experiment)
        tasks.update({"tune": tuned, "train": trained})
        tasks.update(evaluate_and_register(trained.outputs["model"], data.outputs["data"], evaluate, registry,
                                           tracking_uri, experiment))
        with dsl.If(deploy_enabled == True):  # noqa: E712 - kfp builds a condition from ==
            served = deploy_op(registration=tasks["register"].outputs["registration"], config=deploy,
                               tracking_uri=tracking_uri)
            # Deploying changes the world outside the pipeline: never cache it.
            served.set_caching_options(False)
            tasks["deploy"] = served
        if cluster is not None:
            from pipelines.cluster import configure

            configure(tasks, cluster)

    return bincounter_pipeline


def make_data_pipeline(defaults: Optional[PipelineConfig] = None):
    """Only the data stages: the dataset the training would read, as the pipeline's output."""
    d = defaults or PipelineConfig()

    @dsl.pipeline(name="bincounter-data", description="Ingest and preprocess, sharded, into one dataset.")
    def bincounter_data(ingest: dict = d.ingest.params(), preprocess: dict = d.preprocess.params(),
                        shards: int = d.shards) -> Dataset:
        return data_stages(ingest, preprocess, shards)["merge_shards"].outputs["data"]

    return bincounter_data
