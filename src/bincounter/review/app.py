"""``bincounter review``: the page where people count a review queue's bins, and its API.

The page (``GET /``, static files in ``bincounter/review/static``) shows one bin's photo at a
time with a number pad; it never shows the model's count or the expected one. The API needs a
reviewer: a bearer token from the token file, or the identity header of an authenticating proxy.

- ``GET /api/me``: who is signed in, how many bins they answered, how many are left.
- ``GET /api/next``: the next bin for this person (leased to them), or ``{"id": null}``.
- ``GET /api/bins/{id}/photo``: its photo, the sha256 in ``X-Photo-Sha256``.
- ``POST /api/bins/{id}/answer``: ``{"count": n, "photo_sha256": ...}`` or ``{"cant_tell": true, ...}``;
  stored in ``reviews/<id>.json`` with who, when, the photo's sha256 and the model that asked.
- ``POST /api/bins/{id}/skip``: not now, not for this person.
"""

from __future__ import annotations

import hashlib
import logging
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bincounter.audit import review_queue
from bincounter.config import ReviewConfig
from bincounter.data import bounded
from bincounter.data.reviews import Answer, FolderReviews, InvalidReview, S3Reviews, WriteConflict, open_reviews
from bincounter.data.sources import IMAGES, ObjectMissing, SourceError, open_source
from bincounter.ids import is_dataset_id
from bincounter.review.assignments import Assignments
from bincounter.review.auth import NotSignedIn, Reviewers

log = logging.getLogger(__name__)

ASSETS = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
MAX_ANSWER_BYTES = 4096


class AnswerBody(BaseModel):
    """What the page sends: a count, or that the person cannot tell; and the photo they saw."""

    model_config = ConfigDict(extra="forbid", strict=True)
    count: int | None = Field(None, ge=0)
    cant_tell: bool = False
    photo_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


@lru_cache(maxsize=None)
def _static(name: str) -> bytes:
    return (files("bincounter.review") / "static" / name).read_bytes()


def _json(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers={"Cache-Control": "no-store"})


def create_app(cfg: ReviewConfig, queue_path: str | Path, *, reviews: FolderReviews | S3Reviews | None = None,
               source=None) -> FastAPI:
    """The review app over the bins of ``queue_path`` (a ``queue.csv``) at ``cfg.source``."""
    bins, skipped = review_queue.read(queue_path, cfg.max_line_bytes)
    if skipped:
        log.warning("%d lines of %s are not queued bins (first: %s)", len(skipped), queue_path, skipped[0])
    if not bins:
        raise ValueError(f"{queue_path} queues no bins")
    source = source or open_source(cfg.source)
    store = reviews or open_reviews(cfg.source, max_bytes=cfg.max_review_bytes, max_depth=cfg.max_json_depth)
    who = Reviewers(cfg.tokens, cfg.identity_header)

    work = Assignments(bins, load=store.answers, cfg=cfg)
    work.load_all()

    app = FastAPI(title="bincounter review", docs_url=None, redoc_url=None, openapi_url=None)

    def reviewer(request: Request) -> str:
        try:
            return who.name(request.headers.get("authorization"),
                            request.headers.get(cfg.identity_header) if cfg.identity_header else None)
        except NotSignedIn as exc:
            raise HTTPException(401, detail=str(exc), headers={"WWW-Authenticate": "Bearer"}) from None

    def queued(id_: str) -> str:
        if not is_dataset_id(id_) or id_ not in work.bins or id_ in work.excluded:
            raise HTTPException(404, detail="no such bin in this queue")
        return id_

    def photo(id_: str) -> bytes:
        try:
            return source.read(source.key(IMAGES, id_), cfg.max_photo_bytes)
        except ObjectMissing:
            raise HTTPException(404, detail=f"bin {id_} has no photo at the source") from None
        except bounded.Refused as exc:
            raise HTTPException(422, detail=f"bin {id_}'s photo is not served: {exc}") from None
        except SourceError as exc:
            log.error("bin %s: %s", id_, exc)
            raise HTTPException(502, detail="the photos' store did not answer; try again") from None

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return Response(_static("index.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)

    @app.get("/ui/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(404, detail="no such page asset")
        return Response(_static(name), media_type=ASSETS[name], headers=_HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)  # none: browsers ask anyway

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/api/me")
    def me(name: str = Depends(reviewer)) -> dict:
        return {"reviewer": name, "answered": work.answered_by(name), "remaining": work.remaining(),
                "sign_in": who.mode}

    @app.get("/api/next")
    def next_bin(name: str = Depends(reviewer)) -> dict:
        try:
            b = work.next_for(name)
        except SourceError:
            raise HTTPException(502, detail="the reviews' store did not answer; try again") from None
        if b is None:
            return {"id": None, "remaining": work.remaining()}
        return {"id": b.id, "position": b.position, "remaining": work.remaining()}

    @app.get("/api/bins/{id_}/photo")
    def bin_photo(id_: str, name: str = Depends(reviewer)) -> Response:
        data = photo(queued(id_))
        sha = hashlib.sha256(data).hexdigest()
        work.saw_photo(id_, sha)
        return Response(data, media_type="image/jpeg", headers={"X-Photo-Sha256": sha, "Cache-Control": "no-store",
                                                                "X-Content-Type-Options": "nosniff"})

    @app.post("/api/bins/{id_}/answer")
    async def answer(id_: str, request: Request, name: str = Depends(reviewer)) -> Response:
        queued(id_)
        # JSON only: a form post from another site cannot be one without a CORS preflight, which
        # this server never grants.
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return _json(415, "send the answer as application/json")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                return _json(413, f"an answer is at most {MAX_ANSWER_BYTES} bytes")
        try:
            sent = AnswerBody.model_validate_json(body)
        except ValidationError as exc:
            return _json(422, f"not an answer: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"[:300])
        if (sent.count is None) == (not sent.cant_tell):
            return _json(422, "send a count or cant_tell, one of them")
        if sent.count is not None and sent.count > cfg.max_count:
            return _json(422, f"a count is at most {cfg.max_count}")
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_store, id_, name, sent)

    def _store(id_: str, name: str, sent: AnswerBody) -> Response:
        current = work.photo_of(id_) or hashlib.sha256(photo(id_)).hexdigest()
        if sent.photo_sha256 != current:
            return _json(409, "the bin's photo changed since you saw it: nothing stored, count it again")
        entry = Answer.new(name, sent.count, current, work.bins[id_].model)
        try:
            answers = store.append(id_, entry)
        except (InvalidReview, bounded.Refused) as exc:
            log.error("bin %s: %s is not readable (%s); nothing written", id_, store.describe(id_), exc)
            return _json(409, "this bin's reviews file is not readable: nothing stored (it is left as it is)")
        except WriteConflict:
            return _json(503, "too many people answered this bin at once: nothing stored, try again")
        except SourceError as exc:
            log.error("bin %s: %s", id_, exc)
            return _json(502, "the reviews' store did not answer: nothing stored, try again")
        settled = work.answered(name, id_, answers)
        log.info("review: %s answered bin %s: %s (now %s)", name, id_,
                 "can't tell" if entry.count is None else entry.count, settled.status)
        return JSONResponse({"stored": True, "status": settled.status, "answered": work.answered_by(name)},
                            headers={"Cache-Control": "no-store"})

    @app.post("/api/bins/{id_}/skip")
    def skip(id_: str, name: str = Depends(reviewer)) -> dict:
        work.skip(name, queued(id_))
        return {"skipped": True}

    app.state.assignments = work
    return app


def run(cfg: ReviewConfig, queue_path: str | Path) -> None:
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = create_app(cfg, queue_path)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
