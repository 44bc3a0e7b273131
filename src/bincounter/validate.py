"""Checks on one photo and one metadata file; each failure names a reason the report counts."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass

from PIL import Image

# Reasons a sample is quarantined (never silently dropped).
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
NOT_JPEG = "not_jpeg"
TOO_LARGE = "too_large"
CORRUPT = "corrupt_or_truncated"
MISSING_IMAGE = "missing_image"
MISSING_METADATA = "missing_metadata"
BAD_JSON = "unparseable_metadata"
NO_QUANTITY = "missing_expected_quantity"
INCONSISTENT = "inconsistent_quantity"
DUPLICATE = "duplicate_image"
OUT_OF_RANGE = "count_out_of_range"


class Invalid(ValueError):
    """A sample failed a check; ``reason`` is one of the module's reason constants."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class MetadataInfo:
    count: int
    items_quantity: int | None  # sum of item quantities; None when items carry none
    n_items: int
    null_dimensions: int

    @property
    def consistent(self) -> bool:
        return self.items_quantity is None or self.items_quantity == self.count


def check_metadata(raw: bytes) -> MetadataInfo:
    """Parse metadata; raise Invalid when it cannot give a trustworthy count."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise Invalid(BAD_JSON, str(exc)) from exc
    if not isinstance(doc, dict):
        raise Invalid(BAD_JSON, "top level is not an object")
    count = doc.get("EXPECTED_QUANTITY")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise Invalid(NO_QUANTITY, f"EXPECTED_QUANTITY is {count!r}")
    items = doc.get("BIN_FCSKU_DATA") or {}
    if not isinstance(items, dict):
        raise Invalid(BAD_JSON, "BIN_FCSKU_DATA is not an object")
    quantities = [it.get("quantity") for it in items.values() if isinstance(it, dict)]
    numeric = [q for q in quantities if isinstance(q, int) and not isinstance(q, bool)]
    null_dims = sum(
        1
        for it in items.values()
        if isinstance(it, dict)
        for dim in ("height", "length", "width", "weight")
        if not isinstance(it.get(dim), dict) or it[dim].get("value") is None
    )
    return MetadataInfo(
        count=count,
        items_quantity=sum(numeric) if numeric else None,
        n_items=len(items),
        null_dimensions=null_dims,
    )


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open a JPEG and decode it fully; raise Invalid for anything a trainer should not see.

    The size check happens on the header, before decoding, so a decompression bomb never
    allocates its pixels.
    """
    if not data:
        raise Invalid(EMPTY_FILE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Invalid(TOO_LARGE, str(exc)) from exc
    except Exception as exc:  # PIL raises many types for garbage input
        raise Invalid(NOT_AN_IMAGE, str(exc)) from exc
    if img.format != "JPEG":
        raise Invalid(NOT_JPEG, f"format is {img.format}")
    width, height = img.size
    if width * height > max_pixels:
        raise Invalid(TOO_LARGE, f"{width}x{height} exceeds {max_pixels} pixels")
    return img


def decode(img: Image.Image, target: int | None = None) -> Image.Image:
    """Decode to RGB; with ``target``, let libjpeg scale down by DCT (draft mode) first."""
    try:
        if target is not None:
            img.draft("RGB", (target, target))  # never scales below the target size
        img.load()
        return img.convert("RGB")
    except Exception as exc:
        raise Invalid(CORRUPT, str(exc)) from exc
