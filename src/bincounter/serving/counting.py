"""Counting the images of a request: through the micro-batching queue to the workers, each
outcome made the answer every endpoint returns (``CountResult``): the count set when the model
has one, and the inventory check when an expected count was given (``serving.verdict``)."""

from __future__ import annotations

import time

from fastapi import HTTPException, Request
from pydantic import BaseModel

from bincounter.config import ServeConfig, VerdictConfig
from bincounter.serving.batching import Batcher, QueueFull
from bincounter.serving.loading import ModelState
from bincounter.serving.metrics import ServerMetrics
from bincounter.serving.requests import check_image_type, read_body
from bincounter.serving.verdict import count_set, judge
from bincounter.serving.worker import ModelInfo


class CountResult(BaseModel):
    """One image's prediction, as every endpoint returns it."""

    count: int
    confidence: float
    expected_count: float
    probabilities: list[float]
    label: str | None = None  # the class counted ("3", or "6+" for a pooled last class)
    labels: list[str] | None = None  # every class, in the order of ``probabilities``
    model_uri: str
    model_version: str | None = None  # the registry version served (None for a folder or a run)
    count_set: list[str] | None = None  # the counts the bin may hold, at count_set_coverage (it explains, not decides)
    count_set_coverage: float | None = None
    expected: int | None = None
    match: bool | None = None
    probability_of_expected: float | None = None
    probability_record_right: float | None = None  # P(the record is right | photo, record) at error_rate
    error_rate: float | None = None  # the inventory's error rate the verdict assumed
    verdict: str | None = None


class KServeResponse(BaseModel):
    predictions: list[CountResult]


def inventory_check(row: dict, expected: int, info: ModelInfo, cfg: VerdictConfig = VerdictConfig(),
                    error_rate: float | None = None) -> dict:
    """``expected``, ``match``, the probabilities behind the verdict and the verdict, for one answer.

    Class i of the model is the count ``min_count + i``; a pooled last class ("K+") stands
    for every count from K up, so for those its probability is P(count >= K), an upper bound.
    A count the model has no class for gets probabilities null and verdict "unsure". The
    thresholds are ``cfg``'s where set, else those evaluation chose for the model (``info.chosen``);
    ``error_rate`` (a request's own) replaces the configured one.
    """
    overflow = info.overflow_from
    settings = cfg if error_rate is None else cfg.model_copy(update={"error_rate": error_rate})
    judged = judge(expected, row["probabilities"], info.min_count, open_ended=overflow is not None, cfg=settings,
                   chosen=info.chosen)
    match = row["count"] == expected or (overflow is not None and expected >= overflow and row["count"] == overflow)
    return {"expected": expected, "match": bool(match), **judged, "error_rate": settings.error_rate}


def verdict_settings(cfg: VerdictConfig, info: ModelInfo | None) -> dict:
    """What a verdict of this server assumes: the rule, the error rate, and the thresholds in force."""
    flag, match = cfg.thresholds(info.chosen if info else None)
    chosen = bool(info and info.chosen.get(cfg.rule))
    return {"rule": cfg.rule, "error_rate": cfg.error_rate, "off_by_one_share": cfg.off_by_one_share,
            "off_by_more_share": cfg.off_by_more_share,
            "flag_threshold": flag, "match_threshold": match,
            "thresholds_from": "the server's settings" if cfg.flag_threshold is not None and
            cfg.match_threshold is not None else ("the model's evaluation" if chosen else "the rule's defaults")}


def truncate(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Counter:
    """What the counting endpoints share: the model's state, the queue, the metrics."""

    def __init__(self, cfg: ServeConfig, state: ModelState, metrics: ServerMetrics):
        self.cfg, self.state, self.metrics = cfg, state, metrics
        self.batcher: Batcher | None = None  # made in the app's lifespan, on its event loop

    def require_ready(self) -> None:
        state = self.state
        if not state.ready:
            detail = (f"model {state.model_uri} cannot answer now: {state.problem}" if state.status == "ready"
                      else f"model {state.model_uri} is not loaded ({state.status})")
            if state.status != "ready" and state.error:
                detail += f": {state.error}"
            raise HTTPException(503, detail=detail, headers={"Retry-After": "5"})

    async def count(self, images: list[bytes], expected: list[int | None], labels: list[str] | None = None,
                    error_rates: list[float | None] | None = None) -> list[dict]:
        """One answer per image, in order; the first image a worker refuses fails the request.
        ``error_rates``: per image, the inventory's error rate its verdict assumes (None: the server's)."""
        self.require_ready()
        metrics = self.metrics
        started = time.perf_counter()
        try:
            outcomes = await self.batcher.submit(images)
        except QueueFull as exc:
            metrics.rejected.inc()
            raise HTTPException(503, detail=f"server busy: {exc}; retry shortly", headers={"Retry-After": "1"}) from None
        waited = time.perf_counter() - started
        answers = []
        for i, outcome in enumerate(outcomes):
            metrics.images.labels("200" if outcome[0] == "ok" else str(outcome[1])).inc()
            metrics.queue_wait.observe(waited)
            if outcome[0] != "ok":
                where = f" ({labels[i] if labels else f'instance {i}'})" if len(images) > 1 else ""
                raise HTTPException(outcome[1], detail=f"{truncate(outcome[2])}{where}")
            row = outcome[1]
            metrics.predicted_count.observe(row["count"])
            answer = {**row, **self.describe(row), "model_uri": self.state.model_uri}
            if expected[i] is not None:
                answer.update(inventory_check(row, expected[i], self.state.info, self.cfg.verdict,
                                              error_rates[i] if error_rates else None))
            answers.append(answer)
        return answers

    def describe(self, row: dict) -> dict:
        """What every answer says besides the count: the class names and the version served."""
        info = self.state.info
        names = list(info.class_names) if info and info.class_names else None
        out: dict = {"model_version": self.state.version or None}
        if names and len(names) == len(row["probabilities"]):
            out.update(labels=names, label=names[max(range(len(names)), key=row["probabilities"].__getitem__)])
            if info.count_set_threshold is not None:
                out.update(count_set=count_set(row["probabilities"], names, info.count_set_threshold),
                           count_set_coverage=info.count_set_coverage)
        return out

    def verdict_settings(self) -> dict:
        return verdict_settings(self.cfg.verdict, self.state.info)

    async def count_raw(self, request: Request, expected: int | None, error_rate: float | None = None) -> dict:
        """One image sent as the raw request body."""
        check_image_type(request)
        body = await read_body(request, self.cfg.max_body_bytes)
        if not body:
            raise HTTPException(400, detail="empty body: send the image bytes (JPEG or PNG) as the request body")
        return (await self.count([body], [expected], error_rates=[error_rate]))[0]
