"""Kubernetes settings of every compiled pipeline's tasks (kfp-kubernetes), from a ``ClusterConfig``.

Set on the tasks, never inside components, so the same components run on kfp's local runner.
Every task of every variant (main, sharded, GPU, SageMaker, audit) is looked up in ``TASKS`` by
its component function's name: a task without an entry is refused at compile time instead of
silently running without its image, secrets or retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kfp import kubernetes

from bincounter.config import AWS_SECRET_KEYS, MLFLOW_SECRET_KEYS, ClusterConfig, Resources


@dataclass(frozen=True)
class TaskSettings:
    """How one task runs on a cluster."""

    resources: Literal["data", "train", "light"]
    # Its failures are mostly transient (S3, the registry, a node lost): worth a retry.
    retried: bool
    talks_to_mlflow: bool
    # May hold a GPU (with --cluster.gpus): tune and train only.
    gpu: bool = False
    # Cached by its inputs when --cluster.cache-data (the data stages); the rest never are.
    cached: bool = False


TASKS: dict[str, TaskSettings] = {
    "check": TaskSettings("light", retried=False, talks_to_mlflow=True),
    "sagemaker_check": TaskSettings("light", retried=False, talks_to_mlflow=True),
    "shard_indices": TaskSettings("light", retried=False, talks_to_mlflow=False, cached=True),
    "ingest": TaskSettings("data", retried=True, talks_to_mlflow=False, cached=True),
    "preprocess": TaskSettings("data", retried=True, talks_to_mlflow=False, cached=True),
    "merge_shards": TaskSettings("data", retried=True, talks_to_mlflow=False, cached=True),
    "tune": TaskSettings("train", retried=True, talks_to_mlflow=True, gpu=True),
    "train": TaskSettings("train", retried=True, talks_to_mlflow=True, gpu=True),
    # Uploads, starts or follows the job (its name is a digest, so a retry finds it), downloads.
    "sagemaker_train": TaskSettings("light", retried=True, talks_to_mlflow=True),
    "evaluate": TaskSettings("light", retried=True, talks_to_mlflow=True),
    "register": TaskSettings("light", retried=True, talks_to_mlflow=True),
    # Deploy steps retry what a retry can fix themselves (an unreachable API server, a conflict)
    # and fail at once on what it cannot (no kubectl, forbidden, an invalid manifest).
    "deploy": TaskSettings("light", retried=False, talks_to_mlflow=True),
    "sagemaker_deploy": TaskSettings("light", retried=False, talks_to_mlflow=True),
    "audit": TaskSettings("data", retried=True, talks_to_mlflow=True),
}


def settings_of(name: str) -> TaskSettings:
    """The settings of the component function ``name``."""
    if name not in TASKS:
        raise ValueError(f"component {name!r} has no cluster settings: add it to pipelines.cluster.TASKS (image, "
                         "resources, secrets and retries are set from there)")
    return TASKS[name]


def resources_of(settings: TaskSettings, cluster: ClusterConfig) -> Resources:
    return {"data": cluster.data_resources, "train": cluster.train_resources,
            "light": cluster.light_resources}[settings.resources]


def component_of(task) -> str:
    """The name of a task's component function (``sagemaker_train``): what its settings are keyed by."""
    return task.component_spec.name.replace("-", "_")


def configure(tasks, cluster: ClusterConfig) -> None:
    """Images, resources, secrets, retries, caching, /dev/shm and GPU placement of every task."""
    optional = cluster.backend_at_least("2.15")  # older backends drop or reject SecretAsEnv.optional
    for task in tasks:
        s = settings_of(component_of(task))
        gpu = cluster.gpus > 0 and s.gpu
        task.set_container_image(cluster.image_of("cuda" if gpu else "cpu"))
        r = resources_of(s, cluster)
        task.set_cpu_request(r.cpu_request).set_cpu_limit(r.cpu_limit)
        task.set_memory_request(r.memory_request).set_memory_limit(r.memory_limit)
        if cluster.aws_secret:
            kubernetes.use_secret_as_env(task, cluster.aws_secret, {k: k for k in AWS_SECRET_KEYS}, optional=optional)
        if cluster.mlflow_secret and s.talks_to_mlflow:
            kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {k: k for k in MLFLOW_SECRET_KEYS},
                                         optional=optional)
        if s.retried and cluster.retries:
            task.set_retry(cluster.retries, backoff_duration=cluster.retry_backoff, backoff_factor=2.0,
                           backoff_max_duration=cluster.retry_backoff_max)
        if s.cached:
            task.set_caching_options(cluster.cache_data)
        if s.gpu:
            # DataLoader workers pass batches through shared memory; a pod's default /dev/shm is 64 MiB.
            kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=cluster.shm_size)
        if gpu:
            task.set_accelerator_type(cluster.gpu_resource).set_accelerator_limit(cluster.gpus)
            if cluster.gpu_node_label:
                key, value = cluster.gpu_node_label.split("=", 1)
                kubernetes.add_node_selector(task, key, value)
            if cluster.gpu_toleration:
                kubernetes.add_toleration(task, key=cluster.gpu_toleration, operator="Exists", effect="NoSchedule")
