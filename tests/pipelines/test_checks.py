"""What the pipelines' first task checks, and the SageMaker endpoint's MLflow credentials.

The check task fails a run in seconds on what would otherwise fail hours later; the endpoint
reads its MLflow credentials from Secrets Manager (moto, in process) instead of its environment.
"""

from __future__ import annotations

import json
import os

import boto3
import pytest
from moto import mock_aws

from bincounter import launch, tracking
from bincounter.config import SageMakerConfig
from bincounter.serving.credentials import ARN_VARIABLE, SecretError, export_mlflow_credentials

ECR = "123456789012.dkr.ecr.us-east-1.amazonaws.com/bincounter"
SM = SageMakerConfig(role_arn="arn:aws:iam::123456789012:role/bc", bucket="bins", training_image=f"{ECR}:1-cuda",
                     serving_image=f"{ECR}:1")


@pytest.fixture(autouse=True)
def _offline_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_a_tracking_server_that_does_not_answer_fails_the_check_naming_it(monkeypatch) -> None:
    from bincounter_demo.s3server import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(tracking.TrackingServerError, match=f"{url} does not answer.*no MLFLOW_TRACKING_"):
        launch.check(None, tracking_uri=url)


def test_the_local_store_passes_and_a_disabled_deploy_is_not_checked(isolated_home) -> None:
    out = launch.check(None)
    assert out["tracking_uri"].startswith("sqlite:///") and not any(k.startswith("deploy_") for k in out)


@pytest.mark.parametrize(("overrides", "deploy_enabled", "message"), [
    ({"training_image": None}, False, "training_image"),
    ({"role_arn": None}, False, "execution role"),
    ({"bucket": None}, False, "bucket is not set"),
    ({"serving_image": None}, True, "serving_image"),
    ({"serving_image": "ghcr.io/bincounter/bincounter:1"}, True, "only from Amazon ECR"),
])
def test_the_sagemaker_check_refuses_an_incomplete_account_before_any_work(overrides, deploy_enabled,
                                                                           message) -> None:
    sm = SageMakerConfig.model_validate({**SM.model_dump(), **overrides})
    with pytest.raises(ValueError, match=message):
        launch.check_sagemaker(sm, deploy_enabled=deploy_enabled, tracking_uri=None)


def test_the_sagemaker_check_wants_a_tracking_server_the_endpoint_can_reach(isolated_home) -> None:
    with pytest.raises(ValueError, match="local store that a SageMaker endpoint cannot reach"):
        launch.check_sagemaker(SM, deploy_enabled=True, tracking_uri=None)  # the test's SQLite store
    assert launch.check_sagemaker(SM, deploy_enabled=False)["training_image"] == SM.training_image


def test_a_vpc_config_needs_subnets_and_security_groups() -> None:
    with pytest.raises(ValueError, match="go together"):
        SageMakerConfig(endpoint_subnets=("subnet-0a1b2c3d",))
    with pytest.raises(ValueError, match="are not sg-"):
        SageMakerConfig(endpoint_subnets=("subnet-0a1b2c3d",), endpoint_security_groups=("default",))


# --------------------------------------------------------------------------- the endpoint's MLflow credentials


@pytest.fixture
def secrets():
    with mock_aws():
        yield boto3.client("secretsmanager", region_name="us-east-1")


def test_the_server_reads_its_mlflow_credentials_from_the_secret(secrets) -> None:
    arn = secrets.create_secret(Name="team-mlflow", SecretString=json.dumps(
        {"MLFLOW_TRACKING_USERNAME": "team", "MLFLOW_TRACKING_PASSWORD": "s3cret"}))["ARN"]
    env = {ARN_VARIABLE: arn, "MLFLOW_TRACKING_USERNAME": "set-by-hand"}
    assert export_mlflow_credentials(env) == ["MLFLOW_TRACKING_PASSWORD"]
    assert env["MLFLOW_TRACKING_PASSWORD"] == "s3cret" and env["MLFLOW_TRACKING_USERNAME"] == "set-by-hand"
    assert export_mlflow_credentials({}) == []  # no ARN: nothing to read


@pytest.mark.parametrize(("secret", "message"), [
    ("not json", "is not JSON"),
    (json.dumps({"AWS_SECRET_ACCESS_KEY": "x"}), "may hold only MLFLOW_TRACKING_USERNAME"),
    (json.dumps(["MLFLOW_TRACKING_TOKEN"]), "not an object"),
    (json.dumps({"MLFLOW_TRACKING_TOKEN": 7}), "must be a string"),
])
def test_a_secret_that_holds_no_mlflow_credentials_is_refused_with_the_reason(secrets, secret, message) -> None:
    arn = secrets.create_secret(Name="bad", SecretString=secret)["ARN"]
    env = {ARN_VARIABLE: arn}
    with pytest.raises(SecretError, match=message):
        export_mlflow_credentials(env)
    assert set(env) == {ARN_VARIABLE}


def test_a_secret_the_role_cannot_read_names_the_permission(secrets) -> None:
    missing = "arn:aws:secretsmanager:us-east-1:123456789012:secret:nowhere-AbCdEf"
    with pytest.raises(SecretError, match="ResourceNotFoundException.*secretsmanager:GetSecretValue"):
        export_mlflow_credentials({ARN_VARIABLE: missing})


def test_the_server_exports_the_credentials_before_it_resolves_a_registry_uri(secrets, monkeypatch) -> None:
    from bincounter.serving import loading

    arn = secrets.create_secret(Name="token", SecretString=json.dumps({"MLFLOW_TRACKING_TOKEN": "t0ken"}))["ARN"]
    monkeypatch.setenv(ARN_VARIABLE, arn)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "")  # unset, and restored as it was after the test
    loading.configure_tracking("models:/bincounter@champion")
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "t0ken"
