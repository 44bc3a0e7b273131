"""The bincounter pipeline: ingest -> preprocess -> train -> evaluate -> register -> deploy.
Wiring only. Defaults here equal ``bincounter.config``'s (a test keeps them in step); task
placement (GPUs, caching, resources) is set on the tasks, never inside components.
"""


from kfp import dsl

from components.deploy import deploy
from components.evaluate import evaluate
from components.ingest import ingest
from components.preprocess import preprocess
from components.register import register
from components.train import train
from components.tune import tune


def make_pipeline(gpus: int = 0, gpu_type: str = "nvidia.com/gpu"):
    """Build the pipeline; ``gpus`` > 0 asks the cluster for GPUs on the training task."""

    @dsl.pipeline(name="bincounter", description="Count items in warehouse bin photos (Amazon Bin Image Dataset).")
    def bincounter_pipeline(
        source_uri: str = "s3://aft-vbi-pds",
        endpoint_url: str = "",
        anonymous: bool = True,
        file_list: str = "",
        limit: int = 0,
        per_class: int = 0,
        ingest_workers: int = 32,
        image_size: int = 224,
        min_count: int = 0,
        max_count: int = 5,
        overflow: str = "drop",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        backbone: str = "efficientnet_lite0",
        pretrained: str = "auto",
        head: str = "linear",
        loss: str = "ce",
        train_image_size: int = 224,
        epochs: int = 8,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        freeze_backbone: bool = False,
        freeze_early: int = 3,
        early_stopping_patience: int = 5,
        train_workers: int = 2,
        seed: int = 0,
        tune_trials: int = 0,
        tune_epochs: int = 4,
        tune_backbones: str = "",
        eval_batch_size: int = 64,
        model_name: str = "bincounter",
        promotion_metric: str = "accuracy",
        min_improvement: float = 0.0,
        deploy_enabled: bool = True,
        deploy_target: str = "local",
        deploy_model_uri: str = "",
        deploy_image: str = "ghcr.io/bincounter/bincounter:0.1.0",
        deploy_namespace: str = "bincounter",
        deploy_port: int = 0,
        deploy_dry_run: bool = False,
        tracking_uri: str = "",
        experiment: str = "bincounter",
    ):
        raw = ingest(source_uri=source_uri, endpoint_url=endpoint_url, anonymous=anonymous, file_list=file_list,
                     limit=limit, per_class=per_class, workers=ingest_workers)
        data = preprocess(raw=raw.outputs["raw"], image_size=image_size, min_count=min_count, max_count=max_count,
                          overflow=overflow, val_fraction=val_fraction, test_fraction=test_fraction)
        # Always scheduled: with tune_trials=0 it returns at once. (A dsl.If branch would need
        # dsl.OneOf downstream, which kfp's local runner cannot run.)
        tuned = tune(data=data.outputs["data"], trials=tune_trials, epochs=tune_epochs, backbones=tune_backbones,
                     tracking_uri=tracking_uri, experiment=experiment)
        tuned.set_cpu_request("2").set_memory_request("8G")
        trained = train(data=data.outputs["data"], tuned=tuned.outputs["best"], backbone=backbone, pretrained=pretrained, head=head, loss=loss,
                        image_size=train_image_size, epochs=epochs, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, freeze_backbone=freeze_backbone, freeze_early=freeze_early,
                        early_stopping_patience=early_stopping_patience, workers=train_workers, seed=seed,
                        tracking_uri=tracking_uri, experiment=experiment)
        trained.set_cpu_request("2").set_memory_request("8G")
        if gpus:
            for task in (tuned, trained):
                task.set_accelerator_type(gpu_type).set_accelerator_limit(gpus)
        scored = evaluate(model=trained.outputs["model"], data=data.outputs["data"], batch_size=eval_batch_size,
                          tracking_uri=tracking_uri, experiment=experiment)
        registered = register(model=trained.outputs["model"], results=scored.outputs["results"],
                              data=data.outputs["data"], model_name=model_name, metric=promotion_metric,
                              min_improvement=min_improvement, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                              tracking_uri=tracking_uri, experiment=experiment)
        # Registering and deploying change the world outside the pipeline: never cache them.
        registered.set_caching_options(False)
        with dsl.If(deploy_enabled == True):  # noqa: E712 - kfp builds a condition from ==
            served = deploy(registration=registered.outputs["registration"], model_uri=deploy_model_uri,
                            target=deploy_target, image=deploy_image, namespace=deploy_namespace,
                            port=deploy_port, dry_run=deploy_dry_run)
            served.set_caching_options(False)

    return bincounter_pipeline
