"""Deploy the model server to a SageMaker real-time endpoint.

SageMaker runs our own image (``cfg.image``, which must live in Amazon ECR) as a
"bring your own container" model: it starts it as ``docker run <image> serve`` and talks
to ``GET /ping`` and ``POST /invocations`` on port 8080, which the server provides. The
container loads ``MODEL_URI`` from the MLflow registry at ``MLFLOW_TRACKING_URI``, so the
endpoint needs network access to MLflow (VPC config if MLflow is private).

Three requests make a deployment, as in the SageMaker API: CreateModel,
CreateEndpointConfig, then CreateEndpoint (or UpdateEndpoint when the endpoint exists,
which swaps in the new model without downtime). With either backend, an update that
fails is rolled back to the endpoint's previous config (UpdateEndpoint back to it, or, since
a Failed endpoint accepts only DeleteEndpoint, delete and create it again from that config).
Models and endpoint configs are immutable, so each deployment creates new ones with a
timestamp suffix.

The calls go through sagemaker-core (``sagemaker.core.resources`` in SDK v3; the
optional extra ``bincounter[sagemaker]``) and fall back to the boto3 ``sagemaker``
client when it is not installed. Both are imported only when needed. With
``cfg.dry_run`` the request payloads are returned and AWS is not called.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import os
import re
from types import ModuleType, SimpleNamespace
from typing import Any, Literal
from urllib.parse import urlparse

from bincounter.config import DeployConfig

DEFAULT_ENDPOINT = "bincounter"
VARIANT = "AllTraffic"
CONTAINER_PORT = "8080"

_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_ROLE_ARN = re.compile(r"^arn:aws[a-z0-9-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
_ECR_IMAGE = re.compile(
    r"^(?P<account>\d{12})\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?"
    r"/[a-z0-9][a-z0-9._/-]*(?::[\w][\w.-]{0,127}|@sha256:[0-9a-f]{64})$"
)
# Registry URIs the container must resolve through an MLflow server it can reach.
_REGISTRY_SCHEMES = ("models:/", "runs:/")
_REMOTE_TRACKING_SCHEMES = ("http", "https", "databricks")
# sagemaker-core: SDK v3 ships it as sagemaker.core; the 1.x package was sagemaker_core.
_CORE_MODULES = (
    ("sagemaker.core.resources", "sagemaker.core.shapes"),
    ("sagemaker_core.resources", "sagemaker_core.shapes"),
    ("sagemaker_core.main.resources", "sagemaker_core.main.shapes"),
)

Backend = Literal["auto", "sagemaker-core", "boto3"]


class SageMakerConfigError(ValueError):
    """The DeployConfig cannot become a SageMaker endpoint as it is."""


# --------------------------------------------------------------------------- requests


def check_role_arn(arn: str | None, field: str) -> str:
    """``arn`` if it is an IAM role ARN; else a SageMakerConfigError naming the setting ``field``."""
    if not arn:
        raise SageMakerConfigError(
            f"SageMaker needs an execution role: set {field} to the ARN of an IAM role SageMaker can "
            "assume (trust sagemaker.amazonaws.com) that may pull the image from ECR, "
            "e.g. arn:aws:iam::123456789012:role/bincounter-sagemaker"
        )
    if not _ROLE_ARN.match(arn):
        raise SageMakerConfigError(f"{field} {arn!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    return arn


def ecr_region(image: str | None, field: str = "DeployConfig.image") -> str:
    """The region of the ECR image URI ``image``; a SageMakerConfigError if it is not one."""
    match = _ECR_IMAGE.match(image or "")
    if not match:
        raise SageMakerConfigError(
            f"SageMaker pulls images only from Amazon ECR, and {image!r} is not an ECR image URI "
            "(<account>.dkr.ecr.<region>.amazonaws.com/<repo>:<tag>); push the image there "
            f"(see docs/images.md) and set {field}"
        )
    return match["region"]


def _role_arn(cfg: DeployConfig) -> str:
    return check_role_arn(cfg.sagemaker_role_arn, "DeployConfig.sagemaker_role_arn")


def _ecr_region(image: str) -> str:
    return ecr_region(image)


def _tracking_uri(cfg: DeployConfig, tracking_uri: str | None) -> str | None:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if cfg.model_uri.startswith(_REGISTRY_SCHEMES):
            raise SageMakerConfigError(
                f"model URI {cfg.model_uri!r} is resolved through MLflow, but no tracking URI is set: "
                "pass tracking_uri='https://mlflow.example.com' or set $MLFLOW_TRACKING_URI"
            )
        return None
    if urlparse(uri).scheme not in _REMOTE_TRACKING_SCHEMES:
        raise SageMakerConfigError(
            f"tracking URI {uri!r} is a local store that a SageMaker endpoint cannot reach; "
            "use the http(s) address of an MLflow tracking server"
        )
    return uri


def _check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise SageMakerConfigError(f"{kind} {name!r} is not a valid SageMaker name (letters, digits, hyphens; at most 63)")
    return name


def new_suffix() -> str:
    """A deployment's suffix: the UTC second and a random tag, so two deploys in one second differ."""
    import secrets

    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def deployment_name(endpoint_name: str, suffix: str) -> str:
    """``<endpoint>-<suffix>`` within SageMaker's 63 characters. A long endpoint name is cut, not the
    suffix, and a digest of the whole name keeps two long names that share a beginning apart."""
    name = f"{endpoint_name}-{suffix}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(endpoint_name.encode()).hexdigest()[:6]
    stem = endpoint_name[: 63 - len(suffix) - len(digest) - 2].rstrip("-")
    return f"{stem}-{digest}-{suffix}"


def build_requests(
    cfg: DeployConfig,
    *,
    endpoint_name: str = DEFAULT_ENDPOINT,
    tracking_uri: str | None = None,
    suffix: str | None = None,
    environment: dict[str, str] | None = None,
    vpc_config: dict[str, list[str]] | None = None,
    tags: dict[str, str] | None = None,
    startup_timeout: int = 600,
) -> dict[str, dict[str, Any]]:
    """The CreateModel / CreateEndpointConfig / CreateEndpoint payloads (boto3 spelling) for ``cfg``.

    The endpoint payload is also the UpdateEndpoint payload when the endpoint exists.
    ``suffix`` (default: a UTC timestamp) names this deployment's model and config.
    """
    role = _role_arn(cfg)
    _ecr_region(cfg.image)
    uri = _tracking_uri(cfg, tracking_uri)
    _check_name("endpoint name", endpoint_name)
    model_name = _check_name("model name", deployment_name(endpoint_name, suffix or new_suffix()))
    config_name = model_name

    env = {"MODEL_URI": cfg.model_uri, "PORT": CONTAINER_PORT}
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    env.update(environment or {})
    tag_list = [{"Key": k, "Value": v} for k, v in {"app": "bincounter", **(tags or {})}.items()]

    model: dict[str, Any] = {
        "ModelName": model_name,
        "ExecutionRoleArn": role,
        "PrimaryContainer": {"Image": cfg.image, "Mode": "SingleModel", "Environment": env},
        "Tags": tag_list,
    }
    if vpc_config:
        model["VpcConfig"] = {"Subnets": list(vpc_config["Subnets"]), "SecurityGroupIds": list(vpc_config["SecurityGroupIds"])}
    endpoint_config = {
        "EndpointConfigName": config_name,
        "ProductionVariants": [
            {
                "VariantName": VARIANT,
                "ModelName": model_name,
                "InitialInstanceCount": cfg.replicas,
                "InstanceType": cfg.sagemaker_instance_type,
                "InitialVariantWeight": 1.0,
                # Loading the model from MLflow takes a while; the default (~10 min) is
                # spelled out so it is easy to raise.
                "ContainerStartupHealthCheckTimeoutInSeconds": startup_timeout,
            }
        ],
        "Tags": tag_list,
    }
    endpoint = {"EndpointName": endpoint_name, "EndpointConfigName": config_name}
    return {"model": model, "endpoint_config": endpoint_config, "endpoint": endpoint}


# --------------------------------------------------------------------------- backends


def load_sagemaker_core() -> SimpleNamespace | None:
    """sagemaker-core's ``resources`` and ``shapes`` modules, or None if it is not installed."""
    for resources_name, shapes_name in _CORE_MODULES:
        try:
            resources = importlib.import_module(resources_name)
            shapes = importlib.import_module(shapes_name)
        except ImportError:
            continue
        return SimpleNamespace(resources=resources, shapes=shapes)
    return None


def _is_not_found(exc: Exception) -> bool:
    """DescribeEndpoint's answer for a missing endpoint (a ValidationException, not a 404)."""
    response = getattr(exc, "response", None) or {}
    error = response.get("Error", {})
    return error.get("Code") == "ValidationException" and "could not find" in str(error.get("Message", "")).lower()


def _deploy_core(
    core: SimpleNamespace,
    requests: dict[str, dict[str, Any]],
    *,
    region: str,
    session: Any,
    wait: bool,
    timeout: int,
    client: Any = None,
    poll_seconds: float = 30.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Create the model, config and endpoint with sagemaker-core resource classes.

    An update is awaited, and rolled back when it fails, through ``settle`` on a boto3 client
    (``client``, else one from ``session``): one rollback for both backends.
    """
    res: ModuleType = core.resources
    shp: ModuleType = core.shapes
    m, ec, ep = requests["model"], requests["endpoint_config"], requests["endpoint"]
    container = m["PrimaryContainer"]
    tags = [shp.Tag(key=t["Key"], value=t["Value"]) for t in m["Tags"]]
    model_kwargs: dict[str, Any] = {
        "model_name": m["ModelName"],
        "primary_container": shp.ContainerDefinition(
            image=container["Image"], mode=container["Mode"], environment=container["Environment"]
        ),
        "execution_role_arn": m["ExecutionRoleArn"],
        "tags": tags,
        "session": session,
        "region": region,
    }
    if "VpcConfig" in m:
        model_kwargs["vpc_config"] = shp.VpcConfig(
            subnets=m["VpcConfig"]["Subnets"], security_group_ids=m["VpcConfig"]["SecurityGroupIds"]
        )
    res.Model.create(**model_kwargs)
    variant = ec["ProductionVariants"][0]
    res.EndpointConfig.create(
        endpoint_config_name=ec["EndpointConfigName"],
        production_variants=[
            shp.ProductionVariant(
                variant_name=variant["VariantName"],
                model_name=variant["ModelName"],
                initial_instance_count=variant["InitialInstanceCount"],
                instance_type=variant["InstanceType"],
                initial_variant_weight=variant["InitialVariantWeight"],
                container_startup_health_check_timeout_in_seconds=variant["ContainerStartupHealthCheckTimeoutInSeconds"],
            )
        ],
        tags=tags,
        session=session,
        region=region,
    )
    try:
        endpoint = res.Endpoint.get(endpoint_name=ep["EndpointName"], session=session, region=region)
    except Exception as exc:  # botocore ClientError; imported lazily with the SDK
        if not _is_not_found(exc):
            raise
        endpoint = None
    if endpoint is None:
        operation = "create"
        endpoint = res.Endpoint.create(
            endpoint_name=ep["EndpointName"],
            endpoint_config_name=ep["EndpointConfigName"],
            tags=tags,
            session=session,
            region=region,
        )
    else:
        operation = "update"
        previous = endpoint.endpoint_config_name
        # sagemaker-core's update() sends the resource's own endpoint_config_name.
        endpoint.endpoint_config_name = ep["EndpointConfigName"]
        endpoint.update()
        status = None
        if wait:
            settle(client or _client(session, region), ep["EndpointName"], ep["EndpointConfigName"], previous,
                   tags=m["Tags"], timeout=timeout, poll_seconds=poll_seconds, progress=progress)
            status = "InService"
        return {"operation": operation, "status": status, "previous_endpoint_config_name": previous}
    status = None
    if wait:
        endpoint.wait_for_status(target_status="InService", timeout=timeout)
        status = "InService"
    return {"operation": operation, "status": status}


class EndpointUpdateFailed(RuntimeError):
    """A new endpoint config did not come into service; ``rolled_back_to`` names the config
    serving instead (None when nothing could be restored)."""

    def __init__(self, message: str, *, rolled_back_to: str | None):
        super().__init__(message)
        self.rolled_back_to = rolled_back_to


# DescribeEndpoint states that are on their way somewhere else.
_TRANSITIONAL = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting")


def wait_for_endpoint(client: Any, name: str, *, timeout: float, poll_seconds: float = 30.0,
                      progress: bool = True) -> dict[str, Any] | None:
    """Poll DescribeEndpoint until the endpoint leaves the transitional states; its last
    description, or None once it no longer exists (after a delete)."""
    import time

    from tqdm import tqdm

    deadline = time.monotonic() + timeout
    with tqdm(desc=f"endpoint {name}", unit="poll", disable=not progress, leave=False) as bar:
        while True:
            try:
                described = client.describe_endpoint(EndpointName=name)
            except Exception as exc:  # botocore ClientError
                if _is_not_found(exc):
                    return None
                raise
            status = described["EndpointStatus"]
            bar.set_postfix(status=status, config=described.get("EndpointConfigName"))
            bar.update()
            if status not in _TRANSITIONAL:
                return described
            if time.monotonic() >= deadline:
                raise TimeoutError(f"endpoint {name} is still {status} after {timeout:.0f} s")
            time.sleep(poll_seconds)


def _rollback(client: Any, name: str, previous: str, described: dict[str, Any] | None, *, tags: list[dict],
              timeout: float, poll_seconds: float, progress: bool) -> dict[str, Any] | None:
    """Bring ``previous`` back into service after a failed update.

    A Failed endpoint accepts nothing but DeleteEndpoint, so it is deleted and created again
    from ``previous``; an endpoint still in service on another config is updated back.
    """
    status = described["EndpointStatus"] if described else None
    if status == "InService" and described["EndpointConfigName"] == previous:
        return described  # SageMaker kept the old fleet serving: nothing to undo
    if status == "Failed":
        client.delete_endpoint(EndpointName=name)
        wait_for_endpoint(client, name, timeout=timeout, poll_seconds=poll_seconds, progress=progress)
        client.create_endpoint(EndpointName=name, EndpointConfigName=previous, Tags=tags)
    elif status == "InService":
        client.update_endpoint(EndpointName=name, EndpointConfigName=previous)
    else:
        return None  # OutOfService / UpdateRollbackFailed: needs a person
    return wait_for_endpoint(client, name, timeout=timeout, poll_seconds=poll_seconds, progress=progress)


def guardrails(canary_percent: int, *, wait_seconds: int = 600, alarms: tuple[str, ...] = (),
               timeout: int = 3600) -> dict[str, Any] | None:
    """UpdateEndpoint's DeploymentConfig for a canary: SageMaker's blue/green update sends
    ``canary_percent`` of the capacity's traffic to the new fleet, waits ``wait_seconds``, then
    shifts the rest; any of ``alarms`` going off meanwhile rolls it back by itself. None: all at once."""
    if not canary_percent:
        return None
    config: dict[str, Any] = {"BlueGreenUpdatePolicy": {
        "TrafficRoutingConfiguration": {"Type": "CANARY", "CanarySize": {"Type": "CAPACITY_PERCENT",
                                                                         "Value": canary_percent},
                                        "WaitIntervalInSeconds": wait_seconds},
        "TerminationWaitInSeconds": min(wait_seconds, 3600),
        "MaximumExecutionTimeoutInSeconds": max(600, min(timeout, 28800))}}
    if alarms:
        config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": a} for a in alarms]}
    return config


def _deploy_boto3(
    requests: dict[str, dict[str, Any]],
    *,
    region: str,
    session: Any,
    client: Any,
    wait: bool,
    timeout: int,
    poll_seconds: float = 30.0,
    progress: bool = True,
    deployment_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Create the model, config and endpoint with the boto3 ``sagemaker`` client.

    An update that does not reach InService on the new config is rolled back to the config
    the endpoint had before, and then reported as EndpointUpdateFailed.
    """
    if client is None:
        client = _client(session, region)
    client.create_model(**requests["model"])
    client.create_endpoint_config(**requests["endpoint_config"])
    ep = requests["endpoint"]
    name, new_config = ep["EndpointName"], ep["EndpointConfigName"]
    tags = requests["endpoint_config"]["Tags"]
    try:
        previous = client.describe_endpoint(EndpointName=name)["EndpointConfigName"]
    except Exception as exc:  # botocore ClientError
        if not _is_not_found(exc):
            raise
        previous = None
    if previous is not None:
        operation = "update"
        client.update_endpoint(**ep, **({"DeploymentConfig": deployment_config} if deployment_config else {}))
    else:
        operation = "create"
        client.create_endpoint(**ep, Tags=tags)
    outcome: dict[str, Any] = {"operation": operation, "status": None, "previous_endpoint_config_name": previous}
    if wait:
        settle(client, name, new_config, previous, tags=tags, timeout=timeout, poll_seconds=poll_seconds,
               progress=progress)
        outcome["status"] = "InService"
    return outcome


def _client(session: Any, region: str) -> Any:
    if session is None:
        import boto3

        session = boto3.session.Session()
    return session.client("sagemaker", region_name=region)


def settle(client: Any, name: str, new_config: str, previous: str | None, *, tags: list[dict], timeout: float,
           poll_seconds: float = 30.0, progress: bool = True) -> dict[str, Any]:
    """Wait until ``name`` serves ``new_config``; if it does not, bring ``previous`` back (when
    there is one) and raise EndpointUpdateFailed. Returns the InService description."""
    # A TimeoutError propagates: an endpoint still Updating accepts no other update to roll back with.
    described = wait_for_endpoint(client, name, timeout=timeout, poll_seconds=poll_seconds, progress=progress)
    if (described is not None and described["EndpointStatus"] == "InService"
            and described["EndpointConfigName"] == new_config):
        return described
    reason = (described or {}).get("FailureReason") or f"status {(described or {}).get('EndpointStatus', 'gone')}"
    if previous is None:
        raise EndpointUpdateFailed(f"endpoint {name} did not come into service on {new_config}: {reason}",
                                   rolled_back_to=None)
    restored = _rollback(client, name, previous, described, tags=tags, timeout=timeout,
                         poll_seconds=poll_seconds, progress=progress)
    back = restored is not None and restored["EndpointStatus"] == "InService" and restored["EndpointConfigName"] == previous
    raise EndpointUpdateFailed(
        f"endpoint {name}: the update to {new_config} failed ({reason}); "
        + (f"rolled back to {previous}, which is in service" if back
           else f"the rollback to {previous} did not reach InService either: look at the endpoint in the console"),
        rolled_back_to=previous if back else None,
    )


# --------------------------------------------------------------------------- deploy


def check(cfg: DeployConfig, **kwargs: Any) -> dict[str, Any]:
    """The endpoint's requests can be built: a role ARN, an ECR image, a tracking server the
    endpoint can reach, valid names (what ``deploy`` checks before calling AWS)."""
    result = deploy(cfg.model_copy(update={"dry_run": True}), **kwargs)
    return {"target": "sagemaker", "endpoint_name": result["endpoint_name"], "image": cfg.image,
            "region": result["region"]}


def deploy(cfg: DeployConfig, **kwargs: Any) -> dict[str, Any]:
    """Deploy ``cfg.model_uri`` in ``cfg.image`` to a SageMaker real-time endpoint.

    Keyword arguments:
        endpoint_name: endpoint to create or update (default ``bincounter``).
        tracking_uri: MLFLOW_TRACKING_URI for the container (default ``$MLFLOW_TRACKING_URI``;
            must be an http(s) MLflow server the endpoint can reach).
        region: AWS region (default: the ECR image's region).
        environment: extra container environment variables.
        vpc_config: ``{"Subnets": [...], "SecurityGroupIds": [...]}`` to reach a private MLflow.
        tags: extra resource tags.
        suffix: name suffix of the new model and endpoint config (default: UTC timestamp).
        startup_timeout: container start-up health check timeout in seconds (default 600).
        wait: wait until the endpoint is InService (default True).
        timeout: how long to wait, in seconds (default 1800).
        poll_seconds: seconds between DescribeEndpoint calls while an update settles (default 30).
        progress: show a progress bar while waiting (default True).
        backend: "auto" (sagemaker-core if importable, else boto3), "sagemaker-core" or "boto3".
        deployment_config: UpdateEndpoint's DeploymentConfig (``guardrails``: a canary with alarms);
            default from ``cfg.canary_percent``. A canary update goes through boto3.
        session: a boto3 Session to use; client: a ready boto3 sagemaker client (the boto3 backend's
            client; with sagemaker-core, the one that follows an update and rolls it back).

    Instances: ``cfg.replicas`` of ``cfg.sagemaker_instance_type``. Returns
    ``{"target": "sagemaker", "requests": {...}, "applied": bool, ...}``.
    """
    requests = build_requests(
        cfg,
        endpoint_name=kwargs.get("endpoint_name", DEFAULT_ENDPOINT),
        tracking_uri=kwargs.get("tracking_uri"),
        suffix=kwargs.get("suffix"),
        environment=kwargs.get("environment"),
        vpc_config=kwargs.get("vpc_config"),
        tags=kwargs.get("tags"),
        startup_timeout=int(kwargs.get("startup_timeout", 600)),
    )
    region = kwargs.get("region") or _ecr_region(cfg.image)
    endpoint_name = requests["endpoint"]["EndpointName"]
    result: dict[str, Any] = {
        "target": "sagemaker",
        "endpoint_name": endpoint_name,
        "model_name": requests["model"]["ModelName"],
        "endpoint_config_name": requests["endpoint_config"]["EndpointConfigName"],
        "region": region,
        "image": cfg.image,
        "model_uri": cfg.model_uri,
        **(kwargs.get("tags") or {}),
        "requests": requests,
        "dry_run": cfg.dry_run,
        "applied": False,
        "backend": None,
        "operation": None,
        "status": None,
        "invoke_url": f"https://runtime.sagemaker.{region}.amazonaws.com/endpoints/{endpoint_name}/invocations",
    }
    if cfg.dry_run:
        return result

    backend: Backend = kwargs.get("backend", "auto")
    if backend not in ("auto", "sagemaker-core", "boto3"):
        raise ValueError(f"backend must be 'auto', 'sagemaker-core' or 'boto3', not {backend!r}")
    wait = bool(kwargs.get("wait", True))
    timeout = int(kwargs.get("timeout", 1800))
    deployment_config = kwargs.get("deployment_config") or guardrails(cfg.canary_percent, timeout=timeout)
    if deployment_config and backend == "sagemaker-core":
        raise ValueError("a canary update (DeploymentConfig) goes through the boto3 backend; use backend='auto'")
    # sagemaker-core's Endpoint.update sends no DeploymentConfig: a canary goes through boto3.
    core = None if backend == "boto3" or deployment_config else load_sagemaker_core()
    if core is None and backend == "sagemaker-core":
        raise ImportError("sagemaker-core is not installed: pip install 'bincounter[sagemaker]' (or use backend='boto3')")
    if core is not None:
        outcome = _deploy_core(
            core, requests, region=region, session=kwargs.get("session"), wait=wait, timeout=timeout,
            client=kwargs.get("client"), poll_seconds=float(kwargs.get("poll_seconds", 30.0)),
            progress=bool(kwargs.get("progress", True)),
        )
        result["backend"] = "sagemaker-core"
    else:
        outcome = _deploy_boto3(
            requests, region=region, session=kwargs.get("session"), client=kwargs.get("client"), wait=wait,
            timeout=timeout, poll_seconds=float(kwargs.get("poll_seconds", 30.0)), progress=bool(kwargs.get("progress", True)),
            deployment_config=deployment_config,
        )
        result["backend"] = "boto3"
    result.update(outcome, applied=True)
    return result
