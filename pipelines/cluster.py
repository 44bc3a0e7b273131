"""Kubernetes settings of the compiled pipeline's tasks (kfp-kubernetes), from a ``ClusterConfig``.

Set on the tasks, never inside components, so the same components run on kfp's local runner.
"""

from __future__ import annotations

from kfp import kubernetes

from bincounter.config import ClusterConfig, Resources

DATA = ("ingest", "preprocess", "merge_shards")
GPU = ("tune", "train")
# Tasks that read or write S3 (data, artifacts) or the MLflow registry: worth a retry.
REMOTE = ("ingest", "preprocess", "merge_shards", "tune", "train", "evaluate", "register", "deploy")
MLFLOW = ("tune", "train", "evaluate", "register", "deploy")
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")
MLFLOW_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def resources_of(name: str, cluster: ClusterConfig) -> Resources:
    if name in DATA:
        return cluster.data_resources
    if name in GPU:
        return cluster.train_resources
    return cluster.light_resources


def configure(tasks: dict, cluster: ClusterConfig) -> None:
    """Images, resources, secrets, retries, caching, /dev/shm and GPU placement of every task."""
    for name, task in tasks.items():
        gpu = cluster.gpus > 0 and name in GPU
        task.set_container_image(cluster.cuda_image if gpu else cluster.image)
        r = resources_of(name, cluster)
        task.set_cpu_request(r.cpu_request).set_cpu_limit(r.cpu_limit)
        task.set_memory_request(r.memory_request).set_memory_limit(r.memory_limit)
        if cluster.aws_secret:
            kubernetes.use_secret_as_env(task, cluster.aws_secret, {k: k for k in AWS_KEYS}, optional=True)
        if cluster.mlflow_secret and name in MLFLOW:
            kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {k: k for k in MLFLOW_KEYS}, optional=True)
        if name in REMOTE and cluster.retries:
            task.set_retry(cluster.retries, backoff_duration=cluster.retry_backoff, backoff_factor=2.0,
                           backoff_max_duration=cluster.retry_backoff_max)
        if name in DATA or name == "shard_indices":
            task.set_caching_options(cluster.cache_data)
        if name in GPU:
            # DataLoader workers pass batches through shared memory; a pod's default /dev/shm is 64 MiB.
            kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=cluster.shm_size)
        if gpu:
            task.set_accelerator_type(cluster.gpu_resource).set_accelerator_limit(cluster.gpus)
            if cluster.gpu_node_label:
                key, value = cluster.gpu_node_label.split("=", 1)
                kubernetes.add_node_selector(task, key, value)
            if cluster.gpu_toleration:
                kubernetes.add_toleration(task, key=cluster.gpu_toleration, operator="Exists", effect="NoSchedule")
