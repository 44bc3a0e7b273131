"""Reading a request before any model work: the ``expected`` count wherever it is given, content
types, bodies within their size limits, and KServe v1 instances. Every refusal is an
HTTPException with the status and reason the client gets (400, 413, 415, 422)."""

from __future__ import annotations

import base64
import binascii
import re
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
        shown = value if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise HTTPException(422, detail=f"{where} must be an integer from 0 to {EXPECTED_MAX}, got {shown!r}")
    return number


def query_expected(request: Request) -> int | None:
    values = request.query_params.getlist("expected")
    if len(values) > 1:
        raise HTTPException(422, detail="expected is given more than once")
    return parse_expected(values[0], "expected") if values else None


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
    for part in re.split(r"[;,]", request.headers.get(_SAGEMAKER_ATTRIBUTES, "")):
        key, _, value = part.partition("=")
        if key.strip().lower() == "expected":
            found["custom attributes"] = parse_expected(value, "expected in X-Amzn-SageMaker-Custom-Attributes")  # type: ignore[assignment]
    if len(set(found.values())) > 1:
        raise HTTPException(422, detail=f"expected is given differently in {', '.join(found)}")
    return next(iter(found.values()), None)


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


def decode_instances(payload: Any, max_images: int, max_image_bytes: int,
                      default_expected: int | None) -> tuple[list[bytes], list[int | None]]:
    """KServe v1 instances -> image bytes and expected counts; accepts
    ``{"image": {"b64": s}, "expected": n}``, ``{"image": s}`` and ``{"b64": s}``."""
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        raise HTTPException(400, detail='expected {"instances": [{"image": {"b64": "..."}}, ...]}')
    instances = payload["instances"]
    if not instances:
        raise HTTPException(400, detail="instances is empty")
    if len(instances) > max_images:
        raise HTTPException(413, detail=f"{len(instances)} instances exceed the limit of {max_images} per request")
    images, expected = [], []
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
    return images, expected
