"""bincounter.deploy.sagemaker: request payloads, the sagemaker-core calls, the boto3 fallback.

Nothing here reaches AWS: the sagemaker-core resource classes are autospec mocks, and
the boto3 client is wrapped in botocore's Stubber, which also checks every request
against SageMaker's own API model. Payloads are validated against that model too.
"""

from __future__ import annotations

import datetime as dt
from unittest import mock

import botocore.session
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from botocore.validate import validate_parameters

from bincounter.config import DeployConfig
from bincounter.deploy import sagemaker as sm

ECR = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/bincounter:0.1.0"
ROLE = "arn:aws:iam::123456789012:role/bincounter-sagemaker"
MLFLOW = "https://mlflow.example.com"
SUFFIX = "20260101-120000"
NAME = f"bincounter-{SUFFIX}"


@pytest.fixture(autouse=True)
def _offline_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and no ambient MLflow: a slip past the mocks fails instead of calling AWS."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def cfg(**overrides) -> DeployConfig:
    values = dict(
        target="sagemaker",
        image=ECR,
        sagemaker_role_arn=ROLE,
        sagemaker_instance_type="ml.c5.xlarge",
        replicas=2,
        model_uri="models:/bincounter/7",
    )
    values.update(overrides)
    return DeployConfig(**values)


EXPECTED_TAGS = [{"Key": "app", "Value": "bincounter"}]
EXPECTED = {
    "model": {
        "ModelName": NAME,
        "ExecutionRoleArn": ROLE,
        "PrimaryContainer": {
            "Image": ECR,
            "Mode": "SingleModel",
            "Environment": {"MODEL_URI": "models:/bincounter/7", "PORT": "8080", "MLFLOW_TRACKING_URI": MLFLOW},
        },
        "Tags": EXPECTED_TAGS,
    },
    "endpoint_config": {
        "EndpointConfigName": NAME,
        "ProductionVariants": [
            {
                "VariantName": "AllTraffic",
                "ModelName": NAME,
                "InitialInstanceCount": 2,
                "InstanceType": "ml.c5.xlarge",
                "InitialVariantWeight": 1.0,
                "ContainerStartupHealthCheckTimeoutInSeconds": 600,
            }
        ],
        "Tags": EXPECTED_TAGS,
    },
    "endpoint": {"EndpointName": "bincounter", "EndpointConfigName": NAME},
}


def not_found(operation: str = "DescribeEndpoint") -> ClientError:
    error = {"Code": "ValidationException", "Message": 'Could not find endpoint "bincounter".'}
    return ClientError({"Error": error}, operation)


# --------------------------------------------------------------------------- payloads


def test_dry_run_returns_the_exact_payloads_without_calling_aws() -> None:
    with mock.patch.object(sm, "load_sagemaker_core", autospec=True) as core, mock.patch("boto3.session.Session", autospec=True) as session:
        result = sm.deploy(cfg(dry_run=True), tracking_uri=MLFLOW, suffix=SUFFIX)
    core.assert_not_called()
    session.assert_not_called()
    assert result["requests"] == EXPECTED
    assert result["applied"] is False and result["dry_run"] is True
    assert (result["model_name"], result["endpoint_config_name"], result["endpoint_name"]) == (NAME, NAME, "bincounter")
    assert result["region"] == "eu-west-1"  # from the ECR URI
    assert result["invoke_url"] == "https://runtime.sagemaker.eu-west-1.amazonaws.com/endpoints/bincounter/invocations"


def test_payloads_satisfy_the_sagemaker_api_model() -> None:
    requests = sm.build_requests(
        cfg(),
        tracking_uri=MLFLOW,
        environment={"LOG_LEVEL": "debug"},
        vpc_config={"Subnets": ["subnet-0abc"], "SecurityGroupIds": ["sg-0abc"]},
        tags={"team": "vision"},
    )
    api = botocore.session.get_session().get_service_model("sagemaker")
    for operation, key in (
        ("CreateModel", "model"),
        ("CreateEndpointConfig", "endpoint_config"),
        ("CreateEndpoint", "endpoint"),
        ("UpdateEndpoint", "endpoint"),
    ):
        validate_parameters(requests[key], api.operation_model(operation).input_shape)


def test_tracking_uri_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    env = sm.build_requests(cfg())["model"]["PrimaryContainer"]["Environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    # A model that is not in the registry needs no tracking server.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    env = sm.build_requests(cfg(model_uri="s3://bucket/model"))["model"]["PrimaryContainer"]["Environment"]
    assert "MLFLOW_TRACKING_URI" not in env


# --------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize("dry_run", [True, False])
def test_missing_role_arn_is_a_clear_error(dry_run: bool) -> None:
    with pytest.raises(sm.SageMakerConfigError, match="sagemaker_role_arn"):
        sm.deploy(cfg(sagemaker_role_arn=None, dry_run=dry_run), tracking_uri=MLFLOW)


@pytest.mark.parametrize(
    ("overrides", "kwargs", "message"),
    [
        (dict(sagemaker_role_arn="bincounter-role"), {}, "not an IAM role ARN"),
        (dict(image="ghcr.io/bincounter/bincounter:0.1.0"), {}, "only from Amazon ECR"),
        ({}, {"tracking_uri": None}, "no tracking URI"),
        ({}, {"tracking_uri": "sqlite:///mlflow.db"}, "cannot reach"),
        ({}, {"endpoint_name": "bin_counter"}, "not a valid SageMaker name"),
    ],
)
def test_config_errors(overrides: dict, kwargs: dict, message: str) -> None:
    kwargs = {"tracking_uri": MLFLOW, **kwargs}
    with pytest.raises(sm.SageMakerConfigError, match=message):
        sm.deploy(cfg(dry_run=True, **overrides), **kwargs)


# --------------------------------------------------------------------------- sagemaker-core


@pytest.fixture
def core():
    """sagemaker-core with its resource classes replaced by autospec mocks."""
    loaded = sm.load_sagemaker_core()
    if loaded is None:
        pytest.skip("sagemaker-core is not installed (the optional extra bincounter[sagemaker])")
    res = loaded.resources
    real_endpoint = res.Endpoint
    with (
        mock.patch.object(res, "Model", autospec=True),
        mock.patch.object(res, "EndpointConfig", autospec=True),
        mock.patch.object(res, "Endpoint", autospec=True),
    ):
        # An endpoint object as Endpoint.get / Endpoint.create return it, methods autospecced.
        loaded.endpoint_instance = lambda: mock.create_autospec(real_endpoint, instance=True)
        yield loaded


def test_sagemaker_core_creates_model_config_and_endpoint(core) -> None:
    res, shp = core.resources, core.shapes
    res.Endpoint.get.side_effect = not_found()
    endpoint = res.Endpoint.create.return_value = core.endpoint_instance()
    session = object()

    result = sm.deploy(cfg(), tracking_uri=MLFLOW, suffix=SUFFIX, session=session, timeout=900)

    tags = [shp.Tag(key="app", value="bincounter")]
    res.Model.create.assert_called_once_with(
        model_name=NAME,
        primary_container=shp.ContainerDefinition(
            image=ECR,
            mode="SingleModel",
            environment={"MODEL_URI": "models:/bincounter/7", "PORT": "8080", "MLFLOW_TRACKING_URI": MLFLOW},
        ),
        execution_role_arn=ROLE,
        tags=tags,
        session=session,
        region="eu-west-1",
    )
    res.EndpointConfig.create.assert_called_once_with(
        endpoint_config_name=NAME,
        production_variants=[
            shp.ProductionVariant(
                variant_name="AllTraffic",
                model_name=NAME,
                initial_instance_count=2,
                instance_type="ml.c5.xlarge",
                initial_variant_weight=1.0,
                container_startup_health_check_timeout_in_seconds=600,
            )
        ],
        tags=tags,
        session=session,
        region="eu-west-1",
    )
    res.Endpoint.get.assert_called_once_with(endpoint_name="bincounter", session=session, region="eu-west-1")
    res.Endpoint.create.assert_called_once_with(
        endpoint_name="bincounter", endpoint_config_name=NAME, tags=tags, session=session, region="eu-west-1"
    )
    endpoint.wait_for_status.assert_called_once_with(target_status="InService", timeout=900)
    endpoint.update.assert_not_called()
    assert result["backend"] == "sagemaker-core"
    assert (result["operation"], result["status"], result["applied"]) == ("create", "InService", True)


def test_sagemaker_core_updates_an_existing_endpoint(core) -> None:
    res = core.resources
    existing = res.Endpoint.get.return_value = core.endpoint_instance()
    existing.endpoint_config_name = "bincounter-20251201-090000"

    result = sm.deploy(cfg(), tracking_uri=MLFLOW, suffix=SUFFIX, wait=False)

    res.Endpoint.create.assert_not_called()
    assert existing.endpoint_config_name == NAME  # what update() sends
    existing.update.assert_called_once_with()
    existing.wait_for_status.assert_not_called()
    assert (result["operation"], result["status"]) == ("update", None)


def test_sagemaker_core_errors_other_than_not_found_propagate(core) -> None:
    denied = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "DescribeEndpoint")
    core.resources.Endpoint.get.side_effect = denied
    with pytest.raises(ClientError, match="AccessDenied"):
        sm.deploy(cfg(), tracking_uri=MLFLOW, suffix=SUFFIX)
    core.resources.Endpoint.create.assert_not_called()


# --------------------------------------------------------------------------- boto3 fallback


# The Stubber answers in order: each helper queues one call with the request it must receive.
ARN = "arn:aws:sagemaker:eu-west-1:123456789012:"
ENDPOINT = {"EndpointName": "bincounter"}
OLD = "bincounter-20251201-090000"


def _described(status: str, config: str = NAME, reason: str | None = None) -> dict:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    out = {
        "EndpointName": "bincounter",
        "EndpointArn": ARN + "endpoint/bincounter",
        "EndpointConfigName": config,
        "EndpointStatus": status,
        "CreationTime": now,
        "LastModifiedTime": now,
    }
    if reason:
        out["FailureReason"] = reason
    return out


def _expect_model_and_config(stubber: Stubber) -> None:
    stubber.add_response("create_model", {"ModelArn": ARN + f"model/{NAME}"}, EXPECTED["model"])
    stubber.add_response("create_endpoint_config", {"EndpointConfigArn": ARN + f"endpoint-config/{NAME}"},
                         EXPECTED["endpoint_config"])


def _expect_describe(stubber: Stubber, status: str, config: str = NAME, reason: str | None = None) -> None:
    stubber.add_response("describe_endpoint", _described(status, config, reason), ENDPOINT)


def _expect_not_found(stubber: Stubber) -> None:
    stubber.add_client_error("describe_endpoint", service_error_code="ValidationException",
                             service_message='Could not find endpoint "bincounter".', expected_params=ENDPOINT)


def _expect_create(stubber: Stubber, config: str = NAME) -> None:
    stubber.add_response("create_endpoint", {"EndpointArn": ARN + "endpoint/bincounter"},
                         {**ENDPOINT, "EndpointConfigName": config, "Tags": EXPECTED_TAGS})


def _expect_update(stubber: Stubber, config: str = NAME) -> None:
    stubber.add_response("update_endpoint", {"EndpointArn": ARN + "endpoint/bincounter"},
                         {**ENDPOINT, "EndpointConfigName": config})


def _expect_update_started(stubber: Stubber) -> None:
    """A deploy over an endpoint serving OLD: model and config created, the update sent."""
    _expect_model_and_config(stubber)
    _expect_describe(stubber, "InService", OLD)
    _expect_update(stubber)


def test_boto3_fallback_creates_the_endpoint(sagemaker_stub) -> None:
    client, stubber = sagemaker_stub
    _expect_model_and_config(stubber)
    _expect_not_found(stubber)
    _expect_create(stubber)
    _expect_describe(stubber, "InService")  # the waiter

    result = sm.deploy(cfg(), tracking_uri=MLFLOW, suffix=SUFFIX, backend="boto3", client=client)

    assert result["backend"] == "boto3"
    assert (result["operation"], result["status"], result["applied"]) == ("create", "InService", True)


def test_boto3_fallback_updates_an_existing_endpoint(sagemaker_stub) -> None:
    client, stubber = sagemaker_stub
    _expect_model_and_config(stubber)
    _expect_describe(stubber, "InService")
    _expect_update(stubber)

    result = sm.deploy(cfg(), tracking_uri=MLFLOW, suffix=SUFFIX, backend="boto3", client=client, wait=False)

    assert (result["operation"], result["status"]) == ("update", None)


def test_auto_backend_falls_back_to_boto3_without_sagemaker_core(sagemaker_stub) -> None:
    client, stubber = sagemaker_stub
    _expect_model_and_config(stubber)
    _expect_describe(stubber, "InService")
    _expect_update(stubber)
    with mock.patch.object(sm, "load_sagemaker_core", autospec=True, return_value=None):
        result = sm.deploy(cfg(), tracking_uri=MLFLOW, suffix=SUFFIX, client=client, wait=False)
    assert result["backend"] == "boto3"


def test_forcing_sagemaker_core_without_it_installed_says_how_to_get_it() -> None:
    with mock.patch.object(sm, "load_sagemaker_core", autospec=True, return_value=None):
        with pytest.raises(ImportError, match=r"bincounter\[sagemaker\]"):
            sm.deploy(cfg(), tracking_uri=MLFLOW, backend="sagemaker-core")


# --------------------------------------------------------------------------- update and rollback


def _deploy_update(client):
    return sm.deploy(cfg(), tracking_uri=MLFLOW, suffix=SUFFIX, backend="boto3", client=client, timeout=60,
                     poll_seconds=0.01, progress=False)


def test_an_update_waits_through_updating_until_the_new_config_serves(sagemaker_stub) -> None:
    client, stubber = sagemaker_stub
    _expect_update_started(stubber)
    _expect_describe(stubber, "Updating", OLD)
    _expect_describe(stubber, "InService", NAME)

    result = _deploy_update(client)

    assert (result["operation"], result["status"]) == ("update", "InService")
    assert result["previous_endpoint_config_name"] == OLD


def test_a_failed_endpoint_is_recreated_from_the_previous_config(sagemaker_stub) -> None:
    client, stubber = sagemaker_stub
    _expect_update_started(stubber)
    _expect_describe(stubber, "Updating", OLD)
    _expect_describe(stubber, "Failed", NAME, "container failed the ping health check")
    # Rollback: a Failed endpoint accepts only DeleteEndpoint; then it is created from the old config.
    stubber.add_response("delete_endpoint", {}, ENDPOINT)
    _expect_describe(stubber, "Deleting", NAME)
    _expect_not_found(stubber)
    _expect_create(stubber, OLD)
    _expect_describe(stubber, "Creating", OLD)
    _expect_describe(stubber, "InService", OLD)

    with pytest.raises(sm.EndpointUpdateFailed, match=f"ping health check.*rolled back to {OLD}") as failed:
        _deploy_update(client)
    assert failed.value.rolled_back_to == OLD


def test_an_update_that_left_another_config_in_service_is_updated_back(sagemaker_stub) -> None:
    client, stubber = sagemaker_stub
    _expect_update_started(stubber)
    _expect_describe(stubber, "InService", "bincounter-other", "update failed")
    _expect_update(stubber, OLD)
    _expect_describe(stubber, "InService", OLD)

    with pytest.raises(sm.EndpointUpdateFailed, match=f"rolled back to {OLD}") as failed:
        _deploy_update(client)
    assert failed.value.rolled_back_to == OLD


def test_an_update_sagemaker_already_undid_needs_no_further_call(sagemaker_stub) -> None:
    client, stubber = sagemaker_stub
    _expect_update_started(stubber)
    _expect_describe(stubber, "InService", OLD, "out of capacity for ml.c5.xlarge")

    with pytest.raises(sm.EndpointUpdateFailed, match="out of capacity.*rolled back to") as failed:
        _deploy_update(client)
    assert failed.value.rolled_back_to == OLD


def test_a_failed_rollback_says_so(sagemaker_stub) -> None:
    client, stubber = sagemaker_stub
    _expect_update_started(stubber)
    _expect_describe(stubber, "UpdateRollbackFailed", NAME, "both fleets failed")

    with pytest.raises(sm.EndpointUpdateFailed, match="did not reach InService either") as failed:
        _deploy_update(client)
    assert failed.value.rolled_back_to is None


def test_a_create_that_fails_has_nothing_to_roll_back_to(sagemaker_stub) -> None:
    client, stubber = sagemaker_stub
    _expect_model_and_config(stubber)
    _expect_not_found(stubber)
    _expect_create(stubber)
    _expect_describe(stubber, "Failed", NAME, "image not found")

    with pytest.raises(sm.EndpointUpdateFailed, match="image not found") as failed:
        _deploy_update(client)
    assert failed.value.rolled_back_to is None


def test_waiting_gives_up_at_the_timeout(sagemaker_stub) -> None:
    client, stubber = sagemaker_stub
    _expect_describe(stubber, "Updating", NAME)
    _expect_describe(stubber, "Updating", NAME)
    with pytest.raises(TimeoutError, match="still Updating after 0 s"):
        sm.wait_for_endpoint(client, "bincounter", timeout=0.04, poll_seconds=0.05, progress=False)


def test_sagemaker_core_rolls_a_failed_update_back_through_the_same_path(core, sagemaker_stub) -> None:
    client, stubber = sagemaker_stub
    existing = core.resources.Endpoint.get.return_value = core.endpoint_instance()
    existing.endpoint_config_name = OLD
    _expect_describe(stubber, "InService", "bincounter-other", "update failed")
    _expect_update(stubber, OLD)
    _expect_describe(stubber, "InService", OLD)

    with pytest.raises(sm.EndpointUpdateFailed, match=f"rolled back to {OLD}"):
        sm.deploy(cfg(), tracking_uri=MLFLOW, suffix=SUFFIX, client=client, poll_seconds=0.01, progress=False)
    existing.update.assert_called_once_with()
    existing.wait_for_status.assert_not_called()


def test_model_and_config_names_are_unique_whatever_the_endpoint_name() -> None:
    """A 63-character endpoint name must not cut the suffix off (every deploy would get one name),
    and two long names that share their beginning must not share names either."""
    long_a, long_b = "a" * 60 + "-one", "a" * 60 + "-two"
    names = {sm.deployment_name(e, s) for e in (long_a, long_b, "bincounter") for s in ("20261206-010203-ab12",
                                                                                          "20261206-010203-cd34")}
    assert len(names) == 6 and all(len(n) <= 63 and sm._NAME.match(n) for n in names)
    assert sm.deployment_name("bincounter", "20261206-010203-ab12") == "bincounter-20261206-010203-ab12"
    first, second = sm.new_suffix(), sm.new_suffix()
    assert first != second  # two deploys within one second
    requests = [sm.build_requests(cfg(), endpoint_name=long_a, tracking_uri=MLFLOW) for _ in range(2)]
    assert requests[0]["model"]["ModelName"] != requests[1]["model"]["ModelName"]
    assert all(len(r["model"]["ModelName"]) <= 63 for r in requests)


def test_a_canary_update_uses_sagemakers_guardrails_with_its_alarms(sagemaker_stub) -> None:
    """SageMaker's own progressive rollout: blue/green, a canary share first, alarms that roll it
    back; the request is checked against SageMaker's API model by the Stubber."""
    client, stubber = sagemaker_stub
    guard = sm.guardrails(20, wait_seconds=300, alarms=("bincounter-5xx", "bincounter-latency"), timeout=3600)
    assert guard["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"] == {
        "Type": "CANARY", "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 20}, "WaitIntervalInSeconds": 300}
    _expect_model_and_config(stubber)
    _expect_describe(stubber, "InService")
    stubber.add_response("update_endpoint", {"EndpointArn": ARN + "endpoint/bincounter"},
                         {**ENDPOINT, "EndpointConfigName": NAME, "DeploymentConfig": guard})
    result = sm.deploy(cfg(), tracking_uri=MLFLOW, suffix=SUFFIX, client=client, wait=False, deployment_config=guard)
    assert result["operation"] == "update" and result["backend"] == "boto3"
    assert sm.guardrails(0) is None  # no canary: the update as before


def test_a_canary_percent_in_the_deploy_config_becomes_a_canary_update(sagemaker_stub) -> None:
    client, stubber = sagemaker_stub
    _expect_model_and_config(stubber)
    _expect_describe(stubber, "InService")
    stubber.add_response("update_endpoint", {"EndpointArn": ARN + "endpoint/bincounter"},
                         {**ENDPOINT, "EndpointConfigName": NAME, "DeploymentConfig": sm.guardrails(10, timeout=1800)})
    sm.deploy(cfg(canary_percent=10), tracking_uri=MLFLOW, suffix=SUFFIX, client=client, wait=False)
