"""Synthetic bin photos in the Amazon Bin Image Dataset's bucket layout.

Offline demos and tests need photos whose item count is known and learnable, without the
real bucket. :func:`generate` writes ``bin-images/<id>.jpg`` and ``metadata/<id>.json``
exactly where the real bucket keeps them, so every downstream stage runs unchanged on a
local folder of these.

Each photo is a bin seen from above: a textured fabric floor under uneven light, walls at
the borders, 0..N items (boxes, tubs, bags) that may overlap but always keep a visible
part, and 1-3 semi-transparent elastic straps across the front drawn over the items.
Everything is numpy + PIL; a 224 px photo takes about 10 ms to draw and encode.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from pydantic import Field

from bincounter.config import _Config
from bincounter.fileio import atomic_write

__all__ = ["SynthConfig", "generate", "make_metadata", "render_bin"]


class SynthConfig(_Config):
    """Synthetic bin photos in the real bucket's layout, for offline demos and tests."""

    n_images: int = Field(300, ge=1, description="How many photos to generate.")
    max_count: int = Field(5, ge=0, description="Largest number of items in one bin.")
    image_size: int = Field(224, ge=32, description="Width and height of each photo in pixels.")
    seed: int = Field(0, description="Same seed, same photos, byte for byte.")
    jpeg_quality: int = Field(90, ge=10, le=100)

# ImageDraw has no antialiasing: item outlines are drawn at 2x and averaged down.
_SS = 2
# Every item keeps at least this share of its own area uncovered by later items, so the
# count stays visible in the picture rather than being label noise.
_MIN_VISIBLE = 0.5
_PLACEMENT_TRIES = 40
# Domain tags keep the count stream and the per-image streams independent of each other.
_TAG_IMAGE = 0x5EED_0001
_TAG_COUNT = 0x5EED_0002

_ASIN_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))

# (rgb, weight): kraft cardboard dominates, like a fulfilment centre.
_PALETTE: tuple[tuple[tuple[int, int, int], float], ...] = (
    ((178, 136, 90), 4.0),  # kraft
    ((232, 230, 222), 2.0),  # white
    ((40, 40, 45), 0.7),  # black
    ((192, 44, 44), 1.0),  # red
    ((44, 86, 176), 1.0),  # blue
    ((34, 46, 98), 0.7),  # navy
    ((228, 198, 56), 1.0),  # yellow
    ((62, 146, 74), 1.0),  # green
    ((232, 124, 42), 1.0),  # orange
    ((124, 64, 146), 0.7),  # purple
    ((228, 136, 176), 0.7),  # pink
    ((172, 175, 182), 1.0),  # silver
    ((42, 146, 146), 0.8),  # teal
    ((226, 212, 172), 1.0),  # cream
)
_PALETTE_RGB = np.array([c for c, _ in _PALETTE], dtype=np.float32)
_PALETTE_P = np.array([w for _, w in _PALETTE]) / sum(w for _, w in _PALETTE)

_KINDS = ("box", "tub", "bag")
_KIND_P = np.array([0.5, 0.22, 0.28])
_BOX_DETAILS = ("plain", "label", "tape", "band", "pages")

_BRANDS = (
    "Acme", "Northwind", "Bluebird", "Everhome", "Kitchenly", "Pawsome", "Brightline",
    "Trailmark", "Cozyknit", "Voltix", "Greenleaf", "Summit",
)  # fmt: skip
_PRODUCTS = (
    "Stainless Steel Water Bottle", "Phone Case", "Dog Chew Toy", "Spiral Notebook",
    "Ceramic Mug", "USB-C Cable", "Yoga Mat", "LED Desk Lamp", "Hand Cream",
    "Jigsaw Puzzle", "Coffee Filters", "Crew Socks", "Screwdriver Set", "Shampoo",
    "Board Book", "Kitchen Sponges", "AA Batteries", "Garden Gloves",
)  # fmt: skip
_VARIANTS = ("Black", "Blue", "Large", "Small", "6 ft", "12 oz", "24 oz", "Assorted", "Red", "1 Count")


# --------------------------------------------------------------------------- metadata


def _asin(rng: np.random.Generator) -> str:
    return "B0" + "".join(rng.choice(_ASIN_ALPHABET, size=8).tolist())


def _measure(rng: np.random.Generator, lo: float, hi: float) -> float:
    # Log-uniform: product sizes span orders of magnitude.
    return round(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))), 3)


def make_metadata(count: int, rng: np.random.Generator) -> dict:
    """Metadata for a bin holding ``count`` items, in the real bucket's JSON schema.

    The count is split across 1-3 distinct ASINs (never more ASINs than items) whose
    ``quantity`` fields sum to ``EXPECTED_QUANTITY``; a count of 0 gives an empty
    ``BIN_FCSKU_DATA``. Dimensions are inches, weights pounds, as in the real data.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    items: dict[str, dict] = {}
    if count > 0:
        n_asins = int(rng.integers(1, min(3, count) + 1))
        cuts = np.sort(rng.choice(np.arange(1, count), size=n_asins - 1, replace=False)) if n_asins > 1 else []
        quantities = np.diff(np.concatenate([[0], cuts, [count]])).astype(int).tolist()
        for quantity in quantities:
            asin = _asin(rng)
            while asin in items:  # astronomically rare, but keys must be distinct
                asin = _asin(rng)
            base = (
                f"{_BRANDS[rng.integers(len(_BRANDS))]} {_PRODUCTS[rng.integers(len(_PRODUCTS))]}, "
                f"{_VARIANTS[rng.integers(len(_VARIANTS))]}"
            )
            pack = int(rng.choice([1, 1, 1, 2, 3, 4, 6]))
            # The real normalizedName moves the pack size to the front.
            name = f"{base} (Pack of {pack})" if pack > 1 else base
            normalized = f"(Pack of {pack}) {base}" if pack > 1 else base
            items[asin] = {
                "asin": asin,
                "height": {"unit": "IN", "value": _measure(rng, 0.3, 8.0)},
                "length": {"unit": "IN", "value": _measure(rng, 2.0, 16.0)},
                "width": {"unit": "IN", "value": _measure(rng, 1.0, 10.0)},
                "weight": {"unit": "pounds", "value": _measure(rng, 0.05, 8.0)},
                "name": name,
                "normalizedName": normalized,
                "quantity": int(quantity),
            }
    return {"BIN_FCSKU_DATA": items, "EXPECTED_QUANTITY": int(count)}


# --------------------------------------------------------------------------- picture


@dataclass
class _Template:
    """One product: every unit of it looks alike, as several units of one ASIN do."""

    kind: str
    a: float  # half length, output pixels
    b: float  # half width, output pixels
    colour: np.ndarray
    detail: str
    accent: np.ndarray


@dataclass
class _Item:
    template: _Template
    poly: np.ndarray  # (n, 2) outline in output-pixel coordinates
    centre: np.ndarray
    angle: float
    a: float
    b: float
    colour: np.ndarray


def _chaikin(pts: np.ndarray, rounds: int = 2) -> np.ndarray:
    # Corner cutting turns a jagged random polygon into a soft bag-like outline.
    for _ in range(rounds):
        nxt = np.roll(pts, -1, axis=0)
        pts = np.stack([0.75 * pts + 0.25 * nxt, 0.25 * pts + 0.75 * nxt], axis=1).reshape(-1, 2)
    return pts


def _outline(kind: str, a: float, b: float, rng: np.random.Generator) -> np.ndarray:
    if kind == "box":
        return np.array([[-a, -b], [a, -b], [a, b], [-a, b]], dtype=np.float64)
    if kind == "tub":
        t = np.linspace(0, 2 * np.pi, 36, endpoint=False)
        return np.stack([a * np.cos(t), b * np.sin(t)], axis=1)
    n = int(rng.integers(7, 11))
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(-0.25, 0.25, n) * (2 * np.pi / n)
    r = rng.uniform(0.8, 1.1, n)
    return _chaikin(np.stack([a * r * np.cos(t), b * r * np.sin(t)], axis=1))


def _template(rng: np.random.Generator, floor_side: float, scale: float) -> _Template:
    kind = _KINDS[rng.choice(len(_KINDS), p=_KIND_P)]
    a = floor_side * rng.uniform(0.13, 0.22) * scale
    aspect = rng.uniform(1.0, 1.5) if kind == "tub" else rng.uniform(1.1, 2.3)
    colour = _PALETTE_RGB[rng.choice(len(_PALETTE_RGB), p=_PALETTE_P)] * rng.uniform(0.9, 1.08, 3)
    accent = _PALETTE_RGB[rng.integers(len(_PALETTE_RGB))].copy()
    detail = _BOX_DETAILS[rng.integers(len(_BOX_DETAILS))] if kind == "box" else "plain"
    return _Template(kind, a, a / aspect, colour.astype(np.float32), detail, accent)


def _polygon_mask(poly: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    img = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in poly.tolist()], fill=255)
    return np.asarray(img) > 0


def _place_items(
    count: int, rng: np.random.Generator, size: int, floor: tuple[float, float, float, float]
) -> list[_Item]:
    """Drop items one by one, retrying positions until every earlier item stays visible."""
    if count == 0:
        return []
    left, top, right, bottom = floor
    floor_side = min(right - left, bottom - top)
    # Beyond ~6 items shrink them so a full bin still has room for all of them to show.
    scale = min(1.0, float(np.sqrt(6.0 / count)))
    templates = [_template(rng, floor_side, scale) for _ in range(int(rng.integers(1, min(3, count) + 1)))]

    labels = np.zeros((size, size), dtype=np.int32)  # 0 = floor, k = item k (1-based), topmost
    areas: list[int] = []
    items: list[_Item] = []
    for k in range(1, count + 1):
        tpl = templates[int(rng.integers(len(templates)))]
        shrink = 1.0
        best: tuple[float, _Item, np.ndarray, int] | None = None
        for attempt in range(_PLACEMENT_TRIES):
            if attempt and attempt % 10 == 0:
                shrink *= 0.8  # crowded: smaller units fit in the gaps
            jitter = rng.uniform(0.9, 1.1) * shrink
            # At least a few pixels, so even a crowded thumbnail draws every item.
            a, b = max(tpl.a * jitter, 2.0), max(tpl.b * jitter, 1.5)
            margin = 0.6 * b
            cx = rng.uniform(left + margin, max(left + margin + 1, right - margin))
            cy = rng.uniform(top + margin, max(top + margin + 1, bottom - margin))
            angle = rng.uniform(0, np.pi)
            c, s = np.cos(angle), np.sin(angle)
            local = _outline(tpl.kind, a, b, rng)
            poly = local @ np.array([[c, s], [-s, c]]) + [cx, cy]
            mask = _polygon_mask(poly, (size, size))
            area = int(mask.sum())
            if area == 0:  # fell between pixel centres; try elsewhere
                continue
            new_labels = labels.copy()
            new_labels[mask] = k
            if k > 1:
                visible = np.bincount(new_labels.ravel(), minlength=k + 1)[1:k]
                score = float((visible / np.asarray(areas)).min())
            else:
                score = 1.0
            item = _Item(tpl, poly, np.array([cx, cy]), angle, a, b, tpl.colour * rng.uniform(0.94, 1.06, 3))
            if best is None or score > best[0]:
                best = (score, item, new_labels, area)
            if score >= _MIN_VISIBLE:
                break
        if best is None:
            raise RuntimeError(f"could not place item {k} of {count} in a {size} px image")
        _, item, labels, area = best
        areas.append(area)
        items.append(item)
    return items


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _floor_and_walls(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A fabric bin floor with walls at the borders.

    Returns the canvas, channel-first (3, size, size) float32 because numpy broadcasts a
    trailing axis of 3 several times slower, and the floor rectangle (left, top, right, bottom).
    """
    # Inner floor rectangle; the front lip (bottom) tends to be deeper in the real photos.
    left = size * rng.uniform(0.05, 0.13)
    right = size * (1 - rng.uniform(0.05, 0.13))
    top = size * rng.uniform(0.04, 0.11)
    bottom = size * (1 - rng.uniform(0.07, 0.16))

    base = np.empty(3, dtype=np.float32)
    base[0] = rng.uniform(58, 92)
    base[1] = base[0] * rng.uniform(0.86, 1.0)  # grey to brown
    base[2] = base[1] * rng.uniform(0.8, 1.0)

    axis = np.arange(size, dtype=np.float32)
    # Low-frequency blotches (dust, wear) plus a faint weave.
    blotch = Image.fromarray(rng.random((5, 5)).astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
    weave = np.sin(axis * (2 * np.pi / rng.uniform(2.5, 4.5)))
    tex = 1.0 + 0.22 * (np.asarray(blotch) - 0.5) + 0.03 * np.outer(weave, weave)

    # Walls: a pixel belongs to the wall whose floor edge it is furthest past, relative to
    # that wall's thickness; this yields the four trapezoids of a top view. Every term is
    # separable in x and y, so it is built from 1-D profiles.
    past_x = np.stack([left - axis, axis - right])  # (2, size): left, right
    past_y = np.stack([top - axis, axis - bottom])  # top, bottom
    depth_x = past_x / np.array([[left], [size - right]], dtype=np.float32)
    depth_y = past_y / np.array([[top], [size - bottom]], dtype=np.float32)
    wall_gain = rng.uniform(1.15, 1.6, 4).astype(np.float32)
    gain_x, gain_y = wall_gain[depth_x.argmax(axis=0)], wall_gain[depth_y.argmax(axis=0) + 2]
    dx_, dy_ = depth_x.max(axis=0), depth_y.max(axis=0)
    use_x = dx_[None, :] > dy_[:, None]
    d = np.where(use_x, dx_[None, :], dy_[:, None])
    past = np.maximum(past_x.max(axis=0)[None, :], past_y.max(axis=0)[:, None])
    on_wall = np.clip(past + 0.5, 0, 1)  # antialiased floor edge

    # Soft shadow where floor meets wall.
    floor_shade = 1 - 0.35 * np.exp(np.minimum(past, 0) / (0.035 * size))
    wall_shade = np.where(use_x, gain_x[None, :], gain_y[:, None]) * (0.8 + 0.35 * np.clip(d, 0, 1))
    wall_shade *= 1 + 0.15 * (d > 0.9)  # rim catches the light
    shade = floor_shade + on_wall * (wall_shade - floor_shade)
    return base[:, None, None] * (tex * shade)[None], (left, top, right, bottom)


def _hires_mask(poly: np.ndarray, w: int, h: int, width: int = 0) -> np.ndarray:
    """Coverage in [0, 1] of a polygon (fill, or outline of ``width``), drawn at _SS x and averaged."""
    img = Image.new("L", (w * _SS, h * _SS), 0)
    pts = [tuple(p) for p in ((poly + 0.5) * _SS - 0.5).tolist()]
    if width:
        ImageDraw.Draw(img).polygon(pts, outline=255, width=width * _SS)
    else:
        ImageDraw.Draw(img).polygon(pts, fill=255)
    return np.asarray(img.reduce(_SS), dtype=np.float32) * (1 / 255)


def _paint_item(canvas: np.ndarray, item: _Item, light: np.ndarray, rng: np.random.Generator) -> None:
    size = canvas.shape[1]
    a, b = item.a, item.b
    cx, cy = item.centre
    shadow_off = -light * (0.12 * b + 1)
    blur = float(0.08 * b + 0.5)
    pad = int(np.ceil(3 * blur + 2))
    all_pts = np.concatenate([item.poly, item.poly + shadow_off])
    x0, y0 = np.maximum(np.floor(all_pts.min(axis=0)).astype(int) - pad, 0)
    x1, y1 = np.minimum(np.ceil(all_pts.max(axis=0)).astype(int) + pad, size)
    if x1 <= x0 or y1 <= y0:
        return
    w, h = int(x1 - x0), int(y1 - y0)
    local = item.poly - [x0, y0]
    region = canvas[:, y0:y1, x0:x1]

    shadow = Image.new("L", (w, h), 0)
    ImageDraw.Draw(shadow).polygon([tuple(p) for p in (local + shadow_off).tolist()], fill=255)
    shadow = np.asarray(shadow.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32) * (1 / 255)
    region *= 1 - 0.5 * shadow

    alpha = _hires_mask(local, w, h)
    edge = _hires_mask(local, w, h, width=1)

    yy, xx = _grid(size)
    yy, xx = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(item.angle), np.sin(item.angle)
    u, v = dx * c + dy * s, -dx * s + dy * c  # item frame: u along the long side
    lit = (dx * light[0] + dy * light[1]) / a  # > 0 on the side facing the light
    colour = np.empty((3, h, w), dtype=np.float32)
    colour[:] = item.colour[:, None, None]
    kind, detail = item.template.kind, item.template.detail

    if kind == "box":
        shade = 1.0 + 0.12 * lit
        if detail == "label":
            lab = (np.abs(u - 0.25 * a) < 0.35 * a) & (np.abs(v + 0.15 * b) < 0.4 * b)
            colour[:, lab] = np.array([[238], [236], [230]])
        elif detail == "tape":  # packing tape along the seam
            colour[:, np.abs(v) < 0.16 * b] *= np.array([[1.08], [1.02], [0.9]], dtype=np.float32)
        elif detail == "band":  # printed packaging band
            colour[:, np.abs(u + 0.3 * a) < 0.22 * a] = item.template.accent[:, None]
        elif detail == "pages":  # a book: page block along one long edge
            colour[:, v > 0.72 * b] = np.array([[228], [222], [200]])
    elif kind == "tub":
        r2 = (u / a) ** 2 + (v / b) ** 2
        shade = 0.72 + 0.35 * np.sqrt(np.clip(1 - r2, 0, 1)) + 0.12 * lit
        shade *= 1 - 0.2 * ((r2 > 0.62) & (r2 < 0.74))  # lid rim
        hx, hy = cx + light[0] * 0.35 * a, cy + light[1] * 0.35 * b
        shade += 0.35 * np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (0.2 * b) ** 2)
    else:  # polybag: glossy wrinkle highlights
        phi = rng.uniform(0, np.pi)
        freq = rng.uniform(2.5, 5.0) * np.pi / a
        wave = np.sin(freq * (u * np.cos(phi) + v * np.sin(phi)) + rng.uniform(0, 2 * np.pi))
        shade = 0.95 + 0.1 * lit + 0.3 * np.clip(wave, 0, None) ** 6

    # Dark outline: touching units of one product stay separable.
    colour *= shade * (1 - 0.5 * edge)
    region += alpha * (colour - region)


def _draw_straps(canvas: np.ndarray, rng: np.random.Generator, floor: tuple[float, float, float, float]) -> None:
    size = canvas.shape[1]
    _, top, _, bottom = floor
    n = int(rng.integers(1, 4))
    # Spread the straps over the bin front so they do not pile onto each other.
    slots = np.linspace(top + 0.15 * (bottom - top), bottom - 0.05 * (bottom - top), n + 1)
    x = np.arange(size, dtype=np.float32)
    yy = x[:, None]
    t = (x - size / 2) / (size / 2)
    for i in range(n):
        y_mid = rng.uniform(slots[i], slots[i + 1])
        half = size * rng.uniform(0.0175, 0.035)
        slope = rng.uniform(-0.08, 0.08)
        sag = size * rng.uniform(-0.01, 0.04)
        centre = y_mid + slope * (x - size / 2) + sag * (1 - t**2)
        lo, hi = int(max(centre.min() - half - 0.03 * size - 2, 0)), int(min(centre.max() + half + 0.03 * size + 3, size))
        if hi <= lo:
            continue
        d = yy[lo:hi] - centre[None, :]
        cover = np.clip(half - np.abs(d) + 0.5, 0, 1)  # antialiased edges
        alpha = cover * rng.uniform(0.45, 0.7)
        tone = rng.uniform(195, 240)
        tint = np.array([1.0, rng.uniform(0.97, 1.02), rng.uniform(0.95, 1.05)], dtype=np.float32)
        ribs = 1 + 0.08 * np.cos(d * (2 * np.pi / max(2 * half / 3, 2)))  # woven elastic
        colour = (tone * ribs)[None] * tint[:, None, None]
        # The strap hovers above the items: a faint shadow just below it.
        shadow = np.clip(half - np.abs(d - 0.02 * size) + 0.5, 0, 1) * (1 - cover) * 0.25
        band = canvas[:, lo:hi]
        band *= 1 - shadow
        band += alpha * (colour - band)


def render_bin(count: int, rng: np.random.Generator, size: int) -> Image.Image:
    """Draw a ``size`` x ``size`` RGB photo of a bin seen from above holding ``count`` items.

    Items (boxes, tubs, bags) may overlap, but each keeps at least half its area uncovered
    by later items, so the count is recoverable from the picture. 1-3 semi-transparent
    straps are drawn over the items. Deterministic given the state of ``rng``.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    canvas, floor = _floor_and_walls(rng, size)
    angle = rng.uniform(0, 2 * np.pi)
    light = np.array([np.cos(angle), np.sin(angle)])

    for item in _place_items(count, rng, size, floor):
        _paint_item(canvas, item, light, rng)
    _draw_straps(canvas, rng, floor)

    # Uneven lighting, vignette, white balance and sensor noise, as in the real photos.
    r = (np.arange(size, dtype=np.float32) - size / 2) / (size / 2)
    gain = 1 + rng.uniform(0.08, 0.25) * (r[None, :] * light[0] + r[:, None] * light[1])
    gain *= 1 - rng.uniform(0.05, 0.2) * (r[None, :] ** 2 + r[:, None] ** 2) / 2
    gain *= rng.uniform(0.85, 1.15)
    canvas *= gain
    canvas *= rng.uniform(0.94, 1.06, (3, 1, 1)).astype(np.float32)
    # Luminance-only grain: per-channel noise costs 3x the time for no visible gain.
    canvas += rng.standard_normal((size, size), dtype=np.float32) * np.float32(rng.uniform(1.5, 4.5))
    pixels = np.clip(canvas + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")


# --------------------------------------------------------------------------- writing


def _seed_entropy(seed: int) -> list[int]:
    # SeedSequence wants non-negative ints; keep the sign so -1 and 1 differ.
    return [abs(int(seed)), int(seed < 0)]


def _count_for(seed: int, max_count: int, index: int) -> int:
    """Count of image ``index`` (1-based): a shuffled block of 0..max_count per max_count+1 ids.

    Uniform per image like an i.i.d. draw, but exactly balanced over every full block, and
    image i's count never depends on how many images are generated.
    """
    k = max_count + 1
    block, pos = divmod(index - 1, k)
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_COUNT, *_seed_entropy(seed), block]))
    return int(rng.permutation(k)[pos])


def generate(cfg: SynthConfig, out_dir: Path, progress: bool = False) -> list[str]:
    """Write ``cfg.n_images`` synthetic photos and their metadata under ``out_dir``.

    Layout as in the real bucket: ``bin-images/<id>.jpg`` and ``metadata/<id>.json`` with
    ids "00001", "00002", ... Counts are uniform over 0..``cfg.max_count`` (exactly
    balanced per block of ``max_count + 1`` ids). Image i depends only on (seed, i), so the
    same seed gives byte-identical files and a larger ``n_images`` extends a smaller run.
    Each file is written atomically. Returns the ids written, in order.
    """
    out_dir = Path(out_dir)
    img_dir, meta_dir = out_dir / "bin-images", out_dir / "metadata"
    img_dir.mkdir(parents=True, exist_ok=True)
    meta_dir.mkdir(parents=True, exist_ok=True)

    ids: list[str] = []
    for index in tqdm(range(1, cfg.n_images + 1), desc="synth", unit="img", disable=not progress):
        image_id = f"{index:05d}"
        count = _count_for(cfg.seed, cfg.max_count, index)
        # Separate child streams: changing the metadata generator leaves the pictures alone.
        meta_seq, image_seq = np.random.SeedSequence([_TAG_IMAGE, *_seed_entropy(cfg.seed), index]).spawn(2)
        metadata = make_metadata(count, np.random.default_rng(meta_seq))
        image = render_bin(count, np.random.default_rng(image_seq), cfg.image_size)

        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=cfg.jpeg_quality)
        # Image first: a metadata file present implies its image is complete.
        atomic_write(img_dir / f"{image_id}.jpg", buf.getvalue())
        atomic_write(meta_dir / f"{image_id}.json", json.dumps(metadata).encode())
        ids.append(image_id)
    return ids
