"""Reading a request before any model work: the ``expected`` count and the inventory's
``error_rate`` wherever they are given, content
types, bodies within their size limits, and KServe v1 instances. Every refusal is an
HTTPException with the status and reason the client gets (400, 413, 415, 422)."""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request

EXPECTED_MAX = 1000
# A multipart or JSON request carries several images; base64 inflates them by 4/3.
MULTI_IMAGE_BODY_FACTOR = 4
_IMAGE_MEDIA = ("application/octet-stream", "application/x-image")
_EXPECTED_HEADER = "x-expected-count"
_SAGEMAKER_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
_EXPECTED_RE = re.compile(r"^\s*\+?(\d{1,7})\s*$", re.ASCII)

IMAGE_BODY = {
    "required": True,
    "content": {
        media: {"schema": {"type": "string", "format": "binary"}}
        for media in ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
    },
}
EXPECTED_QUERY = {
    "name": "expected", "in": "query", "required": False,
    "description": f"The count the inventory system expects (integer 0..{EXPECTED_MAX}); adds expected, match "
                   "and probability_of_expected to the answer.",
    "schema": {"type": "integer", "minimum": 0, "maximum": EXPECTED_MAX},
}

ERROR_RATE_QUERY = {
    "name": "error_rate", "in": "query", "required": False,
    "description": "The share of the inventory's records that are wrong (0 < error_rate < 1), for the verdict of "
                   "this request; default: the server's setting. Only used with expected.",
    "schema": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
}
_RATE_TEXT_MAX = 32


def parse_error_rate(value: Any, where: str = "error_rate") -> float | None:
    """``error_rate`` from a query string, header, form field or JSON value: a number strictly
    between 0 and 1, else 422."""
    if value is None:
        return None
    rate: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        rate = float(value)
    elif isinstance(value, str) and len(value) <= _RATE_TEXT_MAX:
        try:
            rate = float(value.strip())
        except ValueError:
            rate = None
    if rate is None or not math.isfinite(rate) or not 0.0 < rate < 1.0:
        raise HTTPException(422, detail=f"{where} must be a number between 0 and 1 (exclusive), got {_shown(value)!r}")
    return rate


def query_error_rate(request: Request) -> float | None:
    return _query_once(request, "error_rate", parse_error_rate)


def parse_expected(value: Any, where: str = "expected") -> int | None:
    """``expected`` from a query string, header or JSON value: an integer 0..1000, else 422."""
    if value is None:
        return None
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, str):
        match = _EXPECTED_RE.match(value)
        number = int(match.group(1)) if match else None
    if number is None or not 0 <= number <= EXPECTED_MAX:
        raise HTTPException(422, detail=f"{where} must be an integer from 0 to {EXPECTED_MAX}, got {_shown(value)!r}")
    return number


def query_expected(request: Request) -> int | None:
    return _query_once(request, "expected", parse_expected)


def _query_once(request: Request, name: str, parse: Callable[[Any, str], Any]) -> Any:
    """The query parameter ``name`` parsed, None when absent; 422 when it is given twice."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise HTTPException(422, detail=f"{name} is given more than once")
    return parse(values[0], name) if values else None


def _shown(value: Any) -> Any:
    """A client's value as an error message may quote it: at most about 40 characters."""
    return value if len(repr(value)) <= 40 else repr(value)[:37] + "..."


def _custom_attributes(request: Request) -> dict[str, str]:
    """SageMaker's ``X-Amzn-SageMaker-Custom-Attributes: expected=3; error_rate=0.2`` as a dict
    (a key given twice: 422)."""
    found: dict[str, str] = {}
    for part in re.split(r"[;,]", request.headers.get(_SAGEMAKER_ATTRIBUTES, "")):
        key, _, value = part.partition("=")
        key = key.strip().lower()
        if key in ("expected", "error_rate"):
            if key in found:
                raise HTTPException(422, detail=f"{key} is given more than once in X-Amzn-SageMaker-Custom-Attributes")
            found[key] = value
    return found


def sagemaker_expected(request: Request) -> int | None:
    """``expected`` from ``?expected=``, ``X-Expected-Count`` or SageMaker's custom attributes
    (``X-Amzn-SageMaker-Custom-Attributes: expected=3``); they must agree."""
    found: dict[str, int] = {}
    query = query_expected(request)
    if query is not None:
        found["query"] = query
    header = request.headers.get(_EXPECTED_HEADER)
    if header is not None:
        found[_EXPECTED_HEADER] = parse_expected(header, "X-Expected-Count")  # type: ignore[assignment]
    attribute = _custom_attributes(request).get("expected")
    if attribute is not None:
        found["custom attributes"] = parse_expected(attribute, "expected in X-Amzn-SageMaker-Custom-Attributes")  # type: ignore[assignment]
    if len(set(found.values())) > 1:
        raise HTTPException(422, detail=f"expected is given differently in {', '.join(found)}")
    return next(iter(found.values()), None)


def sagemaker_error_rate(request: Request) -> float | None:
    """``error_rate`` from ``?error_rate=`` or the custom attributes (``error_rate=0.2``); they must agree."""
    query = query_error_rate(request)
    attribute = _custom_attributes(request).get("error_rate")
    given = parse_error_rate(attribute, "error_rate in X-Amzn-SageMaker-Custom-Attributes") if attribute is not None \
        else None
    if query is not None and given is not None and query != given:
        raise HTTPException(422, detail="error_rate is given differently in the query and the custom attributes")
    return query if query is not None else given


def check_image_type(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media and not media.startswith("image/") and media not in _IMAGE_MEDIA:
        raise HTTPException(415, detail=f"content type {media[:100]!r} is not an image: send the image bytes with "
                                        "Content-Type: image/jpeg (or image/png, application/octet-stream)")


def check_type(request: Request, wanted: str, hint: str) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != wanted:
        raise HTTPException(415, detail=f"content type {media[:100]!r} is not {wanted}: {hint}")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) anything over ``limit`` bytes, declared or sent."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise HTTPException(400, detail="invalid Content-Length header")
        if int(declared) > limit:
            raise HTTPException(413, detail=f"body of {int(declared)} bytes exceeds the {limit}-byte limit")
    body = bytearray()
    # Chunked uploads have no Content-Length, so count as we go.
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, detail=f"body exceeds the {limit}-byte limit")
    return bytes(body)


def decode_instances(payload: Any, max_images: int, max_image_bytes: int, default_expected: int | None,
                     default_error_rate: float | None = None) -> tuple[list[bytes], list[int | None], list[float | None]]:
    """KServe v1 instances -> image bytes, expected counts and error rates; accepts
    ``{"image": {"b64": s}, "expected": n, "error_rate": e}``, ``{"image": s}`` and ``{"b64": s}``."""
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        raise HTTPException(400, detail='expected {"instances": [{"image": {"b64": "..."}}, ...]}')
    instances = payload["instances"]
    if not instances:
        raise HTTPException(400, detail="instances is empty")
    if len(instances) > max_images:
        raise HTTPException(413, detail=f"{len(instances)} instances exceed the limit of {max_images} per request")
    images, expected, rates = [], [], []
    for i, instance in enumerate(instances):
        value = instance.get("image", instance) if isinstance(instance, dict) else None
        if isinstance(value, dict):
            value = value.get("b64")
        if not isinstance(value, str):
            raise HTTPException(400, detail=f'instance {i}: expected {{"image": {{"b64": "<base64 image>"}}}}')
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, detail=f"instance {i}: image is not valid base64") from None
        if not data:
            raise HTTPException(400, detail=f"instance {i}: image is empty")
        if len(data) > max_image_bytes:
            raise HTTPException(413, detail=f"instance {i}: image exceeds the {max_image_bytes}-byte limit")
        images.append(data)
        own = parse_expected(instance.get("expected"), f"instance {i}: expected") if isinstance(instance, dict) else None
        if own is not None and default_expected is not None and own != default_expected:
            raise HTTPException(422, detail=f"instance {i}: expected {own} disagrees with ?expected={default_expected}")
        expected.append(own if own is not None else default_expected)
        rate = parse_error_rate(instance.get("error_rate"), f"instance {i}: error_rate") \
            if isinstance(instance, dict) else None
        if rate is not None and default_error_rate is not None and rate != default_error_rate:
            raise HTTPException(422, detail=f"instance {i}: error_rate {rate} disagrees with "
                                            f"?error_rate={default_error_rate}")
        rates.append(rate if rate is not None else default_error_rate)
    return images, expected, rates
