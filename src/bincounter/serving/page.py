"""The one-bin page: ``GET /`` on the model server.

A person picks or drops a bin photo, optionally types the expected count, and sees the
photo, the predicted count, the counts the bin may hold (its count set), the probability of each
count and the server's verdict. The page is static HTML, CSS and a little JS shipped as package
data (``bincounter/serving/static``): no build step, nothing fetched from elsewhere, so it works
offline. It posts the photo's raw bytes to ``v1/count?expected=N`` (relative, so it also works
behind a path prefix) and shows the verdict the server answers; ``ui/config.json`` says which
rule, error rate and thresholds that verdict assumes.

Include it in the server app: ``app.include_router(page.make_router(counter.verdict_settings))``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from importlib.resources import files

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# Only this server's own files and the photo the person chose (a blob: URL) may load.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=None)
def _static(name: str) -> bytes:
    return (files("bincounter.serving") / "static" / name).read_bytes()


def make_router(settings: Callable[[], dict]) -> APIRouter:
    """The page's routes: ``GET /``, ``GET /ui/config.json`` and ``GET /ui/{app.js,style.css}``."""
    router = APIRouter(tags=["page"])

    @router.get("/", include_in_schema=False)
    def index() -> Response:
        """The page."""
        return Response(_static("index.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)

    @router.get("/ui/config.json")
    def page_config() -> dict:
        """What the server's verdicts assume: the rule, the error rate and the thresholds in force."""
        return settings()

    @router.get("/ui/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(404, detail=f"no such page asset {name!r}")
        return Response(_static(name), media_type=ASSETS[name], headers=_HEADERS)

    return router
