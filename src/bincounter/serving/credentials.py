"""MLflow credentials from AWS Secrets Manager, for a server whose environment must not hold them.

A SageMaker endpoint's environment is plain text to anyone who may call DescribeModel, so the
endpoint gets only the secret's ARN (``$BINCOUNTER_MLFLOW_SECRET_ARN``); the server reads the
secret with its execution role when it starts and exports the MLflow keys to its own process.
"""

from __future__ import annotations

import json
import os
from collections.abc import MutableMapping

from bincounter.config import MLFLOW_SECRET_KEYS

ARN_VARIABLE = "BINCOUNTER_MLFLOW_SECRET_ARN"


class SecretError(RuntimeError):
    """The secret cannot be read, or does not hold MLflow credentials."""


def export_mlflow_credentials(environ: MutableMapping[str, str] | None = None, *, client=None) -> list[str]:
    """Read the secret named by ``$BINCOUNTER_MLFLOW_SECRET_ARN`` and set its MLflow keys in
    ``environ`` (default ``os.environ``), leaving keys that are already set alone. Returns the
    keys it set; nothing happens without the variable."""
    env = os.environ if environ is None else environ
    arn = env.get(ARN_VARIABLE)
    if not arn:
        return []
    if client is None:
        import boto3

        region = arn.split(":")[3] if arn.count(":") >= 6 else None
        client = boto3.client("secretsmanager", region_name=region)
    try:
        text = client.get_secret_value(SecretId=arn)["SecretString"]
    except KeyError as exc:
        raise SecretError(f"secret {arn} holds binary data; store the MLflow credentials as JSON text") from exc
    except Exception as exc:  # botocore ClientError / NoCredentialsError, imported lazily with boto3
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        raise SecretError(f"cannot read secret {arn} ({code}): the endpoint's execution role needs "
                          "secretsmanager:GetSecretValue on it (and kms:Decrypt on its key)") from exc
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SecretError(f"secret {arn} is not JSON: store {{\"MLFLOW_TRACKING_USERNAME\": ..., "
                          "\"MLFLOW_TRACKING_PASSWORD\": ...}} or {\"MLFLOW_TRACKING_TOKEN\": ...}") from exc
    if not isinstance(values, dict):
        raise SecretError(f"secret {arn} is JSON but not an object of MLflow keys")
    unknown = sorted(set(values) - set(MLFLOW_SECRET_KEYS))
    if unknown or not values:
        raise SecretError(f"secret {arn} may hold only {', '.join(MLFLOW_SECRET_KEYS)}; it holds "
                          f"{', '.join(unknown) or 'nothing'}")
    if not all(isinstance(v, str) for v in values.values()):
        raise SecretError(f"secret {arn}: every value must be a string")
    set_now = [k for k in MLFLOW_SECRET_KEYS if k in values and not env.get(k)]
    for key in set_now:
        env[key] = values[key]
    return set_now
