"""The native API: ``POST /v1/count`` (one image as the raw body) and ``POST /v1/count:batch``
(multipart files)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from bincounter.config import ServeConfig
from bincounter.serving.counting import CountResult, Counter
from bincounter.serving.requests import (ERROR_RATE_QUERY, EXPECTED_QUERY, IMAGE_BODY, MULTI_IMAGE_BODY_FACTOR,
                                         check_type, parse_error_rate, parse_expected, query_error_rate,
                                         query_expected, read_body)

BATCH_BODY = {
    "parameters": [EXPECTED_QUERY, ERROR_RATE_QUERY],
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "expected": {"type": "array", "items": {"type": "integer"},
                         "description": "One value for every file, or one per file in order."},
            "error_rate": {"type": "number", "description": "The inventory's error rate for every file's verdict."},
        },
    }}}},
}


async def read_files(request: Request, cfg: ServeConfig) -> tuple[list[bytes], list[str], list[int], float | None]:
    """The multipart body's files (in order, with a label each for errors), its ``expected``
    fields and its ``error_rate`` field."""
    body = await read_body(request, cfg.max_body_bytes * MULTI_IMAGE_BODY_FACTOR)

    # The body is already read (to enforce the limit); replay it to the form parser.
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=cfg.max_images, max_fields=cfg.max_images * 2 + 8, max_part_size=cfg.max_body_bytes
        )
    except AssertionError as exc:  # starlette's way of saying python-multipart is missing
        raise HTTPException(501, detail=f"batch uploads are unavailable: {exc}") from None
    except StarletteHTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise HTTPException(413, detail=f"more than {cfg.max_images} files in one request") from None
        raise HTTPException(400, detail=f"malformed multipart body: {exc.detail}") from None
    except Exception as exc:  # noqa: BLE001 - malformed bodies raise parser-specific errors
        raise HTTPException(400, detail=f"malformed multipart body: {type(exc).__name__}") from None
    images: list[bytes] = []
    labels: list[str] = []
    form_expected: list[int] = []
    rates: list[float] = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, str):
                if key == "expected":
                    form_expected.append(parse_expected(value, "form field expected"))  # type: ignore[arg-type]
                elif key == "error_rate":
                    if rates:
                        raise HTTPException(422, detail="form field error_rate is given more than once")
                    rates.append(parse_error_rate(value, "form field error_rate"))  # type: ignore[arg-type]
                continue
            data = await value.read()
            label = f"file {(value.filename or key)[:100]!r}"
            if len(data) > cfg.max_body_bytes:
                raise HTTPException(413, detail=f"{label} exceeds the {cfg.max_body_bytes}-byte limit")
            if not data:
                raise HTTPException(400, detail=f"{label} is empty")
            images.append(data)
            labels.append(label)
    finally:
        await form.close()
    if not images:
        raise HTTPException(400, detail="no image files in the multipart body (send them as file parts)")
    return images, labels, form_expected, (rates[0] if rates else None)


def one_error_rate(form: float | None, query: float | None) -> float | None:
    if form is not None and query is not None:
        raise HTTPException(422, detail="give error_rate either in the query or in the form, not both")
    return form if form is not None else query


def expected_per_file(form_expected: list[int], query: int | None, n: int) -> list[int | None]:
    """One expected count per file: one value for all, one per file, or the query's."""
    if form_expected and query is not None:
        raise HTTPException(422, detail="give expected either in the query or in the form, not both")
    if len(form_expected) == 1:
        return form_expected * n
    if form_expected:
        if len(form_expected) != n:
            raise HTTPException(422, detail=f"{len(form_expected)} expected values for {n} files: "
                                            "give one for all or one per file")
        return list(form_expected)
    return [query] * n


def router(counter: Counter, cfg: ServeConfig) -> APIRouter:
    native = APIRouter(tags=["count"])

    @native.post("/v1/count", response_model=CountResult, response_model_exclude_unset=True,
                 openapi_extra={"requestBody": IMAGE_BODY, "parameters": [EXPECTED_QUERY, ERROR_RATE_QUERY]})
    async def count(request: Request) -> dict[str, Any]:
        """Count the items in one image sent as the raw request body."""
        return await counter.count_raw(request, query_expected(request), query_error_rate(request))

    @native.post("/v1/count:batch", response_model=list[CountResult], response_model_exclude_unset=True,
                 openapi_extra=BATCH_BODY)
    async def count_batch(request: Request) -> list[dict[str, Any]]:
        """Count several images sent as multipart files (any field name), in order."""
        check_type(request, "multipart/form-data", "send the images as multipart/form-data files")
        query, query_rate = query_expected(request), query_error_rate(request)
        images, labels, form_expected, form_rate = await read_files(request, cfg)
        rate = one_error_rate(form_rate, query_rate)
        return await counter.count(images, expected_per_file(form_expected, query, len(images)), labels,
                                   [rate] * len(images))

    return native
