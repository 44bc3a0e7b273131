"""The compiled pipeline's Kubernetes settings (pipelines/cluster.py), read from the IR YAML."""

import pytest
import yaml
from pydantic import ValidationError

from bincounter.config import ClusterConfig, PipelineConfig, TuneConfig
from pipelines.runner import compile_pipeline

SEARCH = PipelineConfig(tune=TuneConfig(trials=2))  # a pipeline with a tune task


def _compile(tmp_path, cluster: ClusterConfig, cfg: PipelineConfig | None = None):
    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", cfg, cluster).read_text()))
    spec, platform = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = {}
    for component in [spec["root"], *spec["components"].values()]:
        tasks.update(component.get("dag", {}).get("tasks", {}))
    executors = {k.removeprefix("exec-"): v["container"] for k, v in spec["deploymentSpec"]["executors"].items()}
    return spec, {k.removeprefix("exec-"): v for k, v in platform.items()}, tasks, executors


def test_every_task_has_requests_limits_and_the_aws_secret(tmp_path):
    _, platform, tasks, executors = _compile(tmp_path, ClusterConfig())
    for name, container in executors.items():
        assert {"cpuRequest", "cpuLimit", "memoryRequest", "memoryLimit"} <= set(container["resources"]), name
        secrets = {s["secretName"]: s for s in platform[name]["secretAsEnv"]}
        aws = secrets["aws-credentials"]
        assert {m["envVar"] for m in aws["keyToEnv"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert aws["optional"] is True  # IRSA clusters need no secret
    for name in ("check", "train", "evaluate", "register", "deploy"):
        secrets = {s["secretName"] for s in platform[name]["secretAsEnv"]}
        assert "mlflow-credentials" in secrets, name
    assert executors["train"]["resources"]["memoryLimit"] > executors["register"]["resources"]["memoryLimit"]


def test_shm_retries_and_caching(tmp_path):
    _, platform, tasks, _ = _compile(tmp_path, ClusterConfig(retries=4, retry_backoff="10s"), SEARCH)
    for name in ("tune", "train"):
        assert platform[name]["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm",
                                                     "sizeLimit": "8Gi", "volumeName": "dshm"}]
    assert "emptyDirMounts" not in platform["evaluate"]
    for name in ("ingest", "preprocess", "tune", "train", "evaluate", "register"):
        assert tasks[name]["retryPolicy"] == {"maxRetryCount": 4, "backoffDuration": "10s", "backoffFactor": 2.0,
                                              "backoffMaxDuration": "3600s"}, name
    # What a retry cannot fix fails at once: the check, and deploy (which retries a transient kubectl error itself).
    for name in ("check", "deploy"):
        assert "retryPolicy" not in tasks[name], name
    for name in ("ingest", "preprocess"):
        assert tasks[name]["cachingOptions"] == {"enableCache": True}
    for name in ("check", "register", "deploy"):
        assert not tasks[name]["cachingOptions"].get("enableCache"), name
    _, _, tasks, _ = _compile(tmp_path, ClusterConfig(cache_data=False, retries=0))
    assert not tasks["ingest"]["cachingOptions"].get("enableCache")
    assert "retryPolicy" not in tasks["ingest"]


def test_gpu_variant_places_tune_and_train_on_gpu_nodes(tmp_path):
    cluster = ClusterConfig(gpus=2, gpu_node_label="cloud.google.com/gke-accelerator=nvidia-l4",
                            gpu_toleration="nvidia.com/gpu")
    _, platform, _, executors = _compile(tmp_path, cluster, SEARCH)
    for name in ("tune", "train"):
        assert executors[name]["resources"]["accelerator"]["resourceCount"] == "2"
        assert executors[name]["image"].endswith("-cuda")
        assert platform[name]["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}
        assert platform[name]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                  "effect": "NoSchedule"}]
    for name in ("ingest", "evaluate", "register"):
        assert "nodeSelector" not in platform[name] and "tolerations" not in platform[name]
        assert "accelerator" not in executors[name]["resources"]
        assert not executors[name]["image"].endswith("-cuda")
    _, platform, _, _ = _compile(tmp_path, ClusterConfig())  # CPU variant: no GPU placement at all
    assert "nodeSelector" not in platform["train"] and "tolerations" not in platform["train"]


@pytest.mark.parametrize("uri", ["", "  ", "sqlite:///mlflow.db", "file:///tmp/mlruns", "/data/mlruns", "mlruns"])
def test_a_local_tracking_store_is_refused_with_what_to_set(uri):
    with pytest.raises(ValidationError, match="--cluster.tracking-uri"):
        ClusterConfig(tracking_uri=uri)


def test_a_local_registry_store_is_refused_too(tmp_path):
    from bincounter.config import RegisterConfig

    cfg = PipelineConfig(registry=RegisterConfig(tracking_uri="sqlite:///x.db"))
    with pytest.raises(ValueError, match="--registry.tracking-uri"):
        compile_pipeline(tmp_path / "p.yaml", cfg, ClusterConfig())


def test_on_a_cluster_the_deploy_step_targets_kubernetes_and_the_server(tmp_path):
    spec, _, _, _ = _compile(tmp_path, ClusterConfig(tracking_uri="https://mlflow.example"))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["deploy"]["defaultValue"]["target"] == "kubernetes"  # a local server dies with its pod
    assert params["tracking_uri"]["defaultValue"] == "https://mlflow.example"
    spec, _, _, _ = _compile(tmp_path, ClusterConfig(deploy_target="kserve"))
    assert spec["root"]["inputDefinitions"]["parameters"]["deploy"]["defaultValue"]["target"] == "kserve"


def test_without_trials_no_tune_task_holds_a_gpu(tmp_path):
    """A search with no trials is no task at all: with --cluster.gpus, only train asks for a GPU."""
    spec, platform, tasks, executors = _compile(tmp_path, ClusterConfig(gpus=1))
    assert "tune" not in tasks and "tune" not in executors
    assert "tune" not in spec["root"]["inputDefinitions"]["parameters"]
    assert "tuned" not in tasks["train"]["inputs"].get("artifacts", {})
    assert [n for n, e in executors.items() if "accelerator" in e["resources"]] == ["train"]
    spec, _, tasks, executors = _compile(tmp_path, ClusterConfig(gpus=1), SEARCH)
    assert tasks["train"]["inputs"]["artifacts"]["tuned"]["taskOutputArtifact"]["producerTask"] == "tune"
    assert spec["root"]["inputDefinitions"]["parameters"]["tune"]["defaultValue"]["trials"] == 2


def test_a_task_without_cluster_settings_is_refused(tmp_path):
    """A renamed or new task must not silently lose its image, secrets and retries."""
    from kfp import dsl

    from pipelines.cluster import configure

    @dsl.component(base_image="python:3.11")
    def unknown() -> None:
        pass

    @dsl.pipeline(name="p")
    def p():
        with pytest.raises(ValueError, match="component .unknown. has no cluster settings: add it to pipelines.cluster.TASKS"):
            configure([unknown()], ClusterConfig())

    p  # noqa: B018 - building the pipeline ran the check
