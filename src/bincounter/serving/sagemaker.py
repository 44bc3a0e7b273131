"""SageMaker hosting: ``GET /ping`` and ``POST /invocations`` (raw image bytes)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from bincounter.serving.counting import CountResult, Counter
from bincounter.serving.probes import readiness
from bincounter.serving.requests import ERROR_RATE_QUERY, EXPECTED_QUERY, IMAGE_BODY, sagemaker_error_rate, sagemaker_expected


def router(counter: Counter) -> APIRouter:
    sagemaker = APIRouter(tags=["sagemaker"])

    @sagemaker.get("/ping")
    def ping() -> JSONResponse:
        """SageMaker health check: 200 when the model is loaded."""
        return readiness(counter.state)

    @sagemaker.post("/invocations", response_model=CountResult, response_model_exclude_unset=True,
                    openapi_extra={"requestBody": IMAGE_BODY, "parameters": [EXPECTED_QUERY, ERROR_RATE_QUERY]})
    async def invocations(request: Request) -> dict[str, Any]:
        """SageMaker inference: raw image bytes in, the same JSON as ``/v1/count`` out; ``expected``
        as ``?expected=``, ``X-Expected-Count`` or ``X-Amzn-SageMaker-Custom-Attributes: expected=N``, and
        ``error_rate`` as ``?error_rate=`` or in the custom attributes (``expected=3; error_rate=0.2``)."""
        return await counter.count_raw(request, sagemaker_expected(request), sagemaker_error_rate(request))

    return sagemaker
