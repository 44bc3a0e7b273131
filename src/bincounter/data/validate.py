"""Checks on one photo and one metadata file; each failure names a reason the report counts."""

from __future__ import annotations

import io
import math
import reprlib
import warnings
from collections import Counter
from dataclasses import dataclass

from PIL import Image

from bincounter.data import bounded

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
INVALID_ID = "invalid_id"  # a manifest id that could not be a file name ("../x"): never read
DUPLICATE_KEY = "duplicate_expected_quantity"  # the label is stated twice: json would keep the last
METADATA_TOO_LARGE = "metadata_too_large"  # over the size limit: never parsed
METADATA_TOO_DEEP = "metadata_too_deep"  # nested deeper than the limit: never parsed
OUTSIDE_FOLDER = "outside_folder"  # a symlink out of the folder: never read
NOT_A_FILE = "not_a_regular_file"  # a FIFO, device or folder where a file should be: never read

# No bin holds a million items: a larger EXPECTED_QUANTITY is a corrupt label, whatever the classes.
MAX_COUNT = 10**6

JPEG_SOI = b"\xff\xd8\xff"  # start-of-image marker, then the first segment's marker


class Invalid(ValueError):
    """A sample failed a check; ``reason`` is one of the module's reason constants."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# Only metadata has a size limit (a photo's is its pixel count, TOO_LARGE), so a refused size is metadata's.
_REFUSALS = {bounded.TooLarge: METADATA_TOO_LARGE, bounded.TooDeep: METADATA_TOO_DEEP,
             bounded.OutsideFolder: OUTSIDE_FOLDER, bounded.NotAFile: NOT_A_FILE}


def refusal(exc: bounded.Refused) -> Invalid:
    """The Invalid, with its reason, for input that ``bounded`` refused to read or parse."""
    return Invalid(_REFUSALS[type(exc)], str(exc))


@dataclass(frozen=True)
class MetadataInfo:
    count: int
    items_quantity: int | None  # sum of item quantities; None when BIN_FCSKU_DATA is absent
    n_items: int
    null_dimensions: int
    bad_quantities: tuple[str, ...] = ()  # items whose ``quantity`` is missing or not a count
    # What the items add up to (quantity x each item's size or weight); None when any item lacks
    # a usable figure. Training can learn them as auxiliary targets: they say what an item is.
    items_volume_in3: float | None = None
    items_weight_lb: float | None = None

    @property
    def consistent(self) -> bool:
        if self.bad_quantities:
            return False
        return self.items_quantity is None or self.items_quantity == self.count

    def describe_inconsistency(self) -> str:
        """Why ``consistent`` is False, for the quarantine record."""
        if self.bad_quantities:
            return f"EXPECTED_QUANTITY={self.count}, items without a usable quantity: {', '.join(self.bad_quantities)}"
        return f"EXPECTED_QUANTITY={self.count}, items sum to {self.items_quantity}"


def _is_count(value: object) -> bool:
    # bool is an int subclass, and 2.0 or "2" means the file was written by something else:
    # both are flagged rather than coerced, so a label is never guessed.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _Duplicated(dict):
    """A JSON object in which some keys appear more than once (json.loads keeps the last)."""

    def __init__(self, pairs: list[tuple[str, object]], duplicated: frozenset[str]):
        super().__init__(pairs)
        self.duplicated = duplicated


def _object(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    return _Duplicated(pairs, frozenset(k for k, n in Counter(k for k, _ in pairs).items() if n > 1))


def _stated_twice(obj: object, key: str) -> bool:
    return key in getattr(obj, "duplicated", ())


def parse_metadata(raw: bytes, *, max_bytes: int, max_depth: int) -> dict:
    """The metadata's top-level object, parsed within the bounds; Invalid with the reason otherwise."""
    try:
        doc = bounded.loads(raw, max_bytes=max_bytes, max_depth=max_depth, what="metadata", object_pairs_hook=_object)
    except bounded.Refused as exc:
        raise refusal(exc) from exc
    except ValueError as exc:  # also UnicodeDecodeError
        raise Invalid(BAD_JSON, str(exc)) from exc
    if not isinstance(doc, dict):
        raise Invalid(BAD_JSON, "top level is not an object")
    return doc


def expected_quantity(doc: dict) -> int:
    """EXPECTED_QUANTITY when it plainly states a count; Invalid otherwise (missing, null, bool,
    float, string, negative, over MAX_COUNT, or stated twice)."""
    if _stated_twice(doc, "EXPECTED_QUANTITY"):
        raise Invalid(DUPLICATE_KEY, "EXPECTED_QUANTITY appears more than once in the object")
    count = doc.get("EXPECTED_QUANTITY")
    if not _is_count(count) or count > MAX_COUNT:
        raise Invalid(NO_QUANTITY, f"EXPECTED_QUANTITY is {reprlib.repr(count)}")
    return count


def read_count(raw: bytes, *, max_bytes: int, max_depth: int) -> int:
    """The label of raw metadata, parsed within the bounds; Invalid with the reason otherwise."""
    return expected_quantity(parse_metadata(raw, max_bytes=max_bytes, max_depth=max_depth))


def check_metadata(raw: bytes, *, max_bytes: int, max_depth: int) -> MetadataInfo:
    """Parse metadata within the bounds; raise Invalid when it cannot give a trustworthy count.

    A count that disagrees with its items does not raise: the caller's policy decides
    (``MetadataInfo.consistent``). It disagrees when the items' quantities do not sum to
    ``EXPECTED_QUANTITY`` (an empty ``BIN_FCSKU_DATA`` sums to 0), or when an item's quantity
    is missing, null, negative, not an integer or stated twice (the sum cannot be trusted then).
    """
    doc = parse_metadata(raw, max_bytes=max_bytes, max_depth=max_depth)
    count = expected_quantity(doc)
    if "BIN_FCSKU_DATA" not in doc or doc["BIN_FCSKU_DATA"] is None:
        return MetadataInfo(count=count, items_quantity=None, n_items=0, null_dimensions=0)
    items = doc["BIN_FCSKU_DATA"]
    if not isinstance(items, dict):
        raise Invalid(BAD_JSON, "BIN_FCSKU_DATA is not an object")
    bad = tuple(str(asin) for asin, it in items.items()
                if not isinstance(it, dict) or not _is_count(it.get("quantity")) or _stated_twice(it, "quantity"))
    # Null dimensions or weight are common in the real data and harmless for counting.
    null_dims = sum(
        1
        for it in items.values()
        if isinstance(it, dict)
        for dim in ("height", "length", "width", "weight")
        if not isinstance(it.get(dim), dict) or it[dim].get("value") is None
    )
    return MetadataInfo(
        count=count,
        items_quantity=sum(it["quantity"] for it in items.values() if isinstance(it, dict) and _is_count(it.get("quantity"))),
        n_items=len(items),
        null_dimensions=null_dims,
        bad_quantities=bad,
        items_volume_in3=None if bad else _items_total(items, ("height", "length", "width"), "IN"),
        items_weight_lb=None if bad else _items_total(items, ("weight",), "pounds"),
    )


def _measure(value: object, unit: str) -> float | None:
    if not isinstance(value, dict) or value.get("unit") != unit:
        return None
    v = value.get("value")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        return None
    return float(v)


def _items_total(items: dict, dims: tuple[str, ...], unit: str) -> float | None:
    """Sum over items of quantity x the product of ``dims`` (all in ``unit``), or None."""
    total = 0.0
    for it in items.values():
        figures = [_measure(it.get(d), unit) for d in dims]
        if any(f is None for f in figures):
            return None
        total += it["quantity"] * math.prod(figures)
    return total


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
        # A JPEG whose header is cut short is a damaged photo, not some other kind of file.
        reason = CORRUPT if data.startswith(JPEG_SOI) else NOT_AN_IMAGE
        raise Invalid(reason, str(exc)) from exc
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
        return img if img.mode == "RGB" else img.convert("RGB")  # convert would copy even then
    except Exception as exc:
        raise Invalid(CORRUPT, str(exc)) from exc


def verify_decodes(img: Image.Image) -> None:
    """Decode every block of a JPEG at the smallest DCT scale (1/8), discarding the pixels.

    libjpeg still reads and entropy-decodes the whole file, so truncation and broken
    segments raise exactly as in a full decode, at about two thirds of its cost: used
    for photos that are already the target size and are stored as they are.
    """
    try:
        width, height = img.size
        img.draft(img.mode, ((width + 7) // 8, (height + 7) // 8))
        img.load()
    except Exception as exc:
        raise Invalid(CORRUPT, str(exc)) from exc
