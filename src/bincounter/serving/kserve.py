"""KServe v1: ``GET /v1/models``, ``GET /v1/models/{name}`` (readiness) and
``POST /v1/models/{name}:predict`` with ``{"instances": [{"image": {"b64": "..."}}]}``."""

from __future__ import annotations

import json
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from bincounter.config import ServeConfig
from bincounter.serving.counting import Counter, KServeResponse
from bincounter.serving.requests import (ERROR_RATE_QUERY, EXPECTED_QUERY, MULTI_IMAGE_BODY_FACTOR, decode_instances,
                                         query_error_rate, query_expected, read_body)


def router(counter: Counter, cfg: ServeConfig) -> APIRouter:
    kserve = APIRouter(tags=["kserve"])

    def check_name(name: str) -> None:
        if cfg.model_name is not None and name != cfg.model_name:
            raise HTTPException(404, detail=f"model {name[:100]!r} does not exist (this server serves {cfg.model_name!r})")

    @kserve.get("/v1/models")
    def kserve_list() -> dict[str, list[str]]:
        """KServe v1: the served model names."""
        return {"models": [cfg.model_name or "bincounter"]}

    @kserve.post("/v1/models/{name}:predict", response_model=KServeResponse, response_model_exclude_unset=True,
                 openapi_extra={"parameters": [EXPECTED_QUERY, ERROR_RATE_QUERY]})
    async def kserve_predict(name: str, request: Request) -> dict[str, Any]:
        """KServe v1 predict: ``{"instances": [{"image": {"b64": "..."}, "expected": 3, "error_rate": 0.2}]}``."""
        check_name(name)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media and media != "application/json":
            raise HTTPException(415, detail=f"content type {media[:100]!r} is not application/json")
        query, query_rate = query_expected(request), query_error_rate(request)
        raw = await read_body(request, cfg.max_body_bytes * MULTI_IMAGE_BODY_FACTOR)

        def parse() -> tuple[list[bytes], list[int | None], list[float | None]]:
            try:
                payload = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise HTTPException(400, detail=f"body is not valid JSON: {exc}") from None
            except RecursionError:
                raise HTTPException(400, detail="body is not valid JSON: nested too deeply") from None
            return decode_instances(payload, cfg.max_images, cfg.max_body_bytes, query, query_rate)

        # Parsing megabytes of JSON and base64 would stall every other request: a thread does it.
        images, expected, rates = await anyio.to_thread.run_sync(parse)
        return {"predictions": await counter.count(images, expected, error_rates=rates)}

    @kserve.get("/v1/models/{name}")
    def kserve_ready(name: str) -> JSONResponse:
        """KServe v1 model readiness: 200 when loaded, else 503."""
        check_name(name)
        ready = counter.state.ready
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    return kserve
