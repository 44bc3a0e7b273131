"""Hostile and good requests for the model server's fuzz test (test helpers, not shipped).

Each generator returns a :class:`Probe`: the request and the statuses a correct server may
answer it with.
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import urllib.parse
import zlib
from dataclasses import dataclass, field

from PIL import Image


@dataclass
class Probe:
    kind: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    allowed: frozenset[int] = frozenset()
    good: bytes | None = None  # a good image whose answer must be exactly the reference's
    expected: int | None = None
    chunked: bool = False


def jpeg(rng: random.Random, width: int | None = None, height: int | None = None) -> bytes:
    width = width or rng.randint(40, 400)
    height = height or rng.randint(40, 400)
    img = Image.effect_noise((width, height), rng.uniform(10, 80)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(50, 95))
    return buf.getvalue()


def big_photo(rng: random.Random, size: int = 1900) -> bytes:
    """A large JPEG that compresses well (shapes on a gradient): slow to decode, small to send."""
    from PIL import ImageDraw

    img = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = rng.randrange(size - 200), rng.randrange(size - 200)
        draw.rectangle([x, y, x + rng.randint(50, 200), y + rng.randint(50, 200)], fill=tuple(rng.randrange(256) for _ in "rgb"))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def noisy_png(rng: random.Random) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((rng.randint(60, 200), rng.randint(60, 200)), 50).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(width: int = 30000, height: int = 30000) -> bytes:
    """Under 1 KB, declares width x height, image data truncated: crashed torchvision's decoder."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 5000)[:200])


def huge_jpeg(rng: random.Random) -> bytes:
    data = bytearray(jpeg(rng, 64, 64))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def huge_gif() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (8, 8)).save(buf, format="GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen
    at = data.index(b"\x2c")  # image descriptor
    data[at + 5:at + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def huge_webp() -> bytes:
    """A VP8X header declaring a 16384 x 16384 canvas and nothing else."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (16383).to_bytes(3, "little") * 2
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def huge_tiff() -> bytes:
    entries = [(256, 4, 1, 100000), (257, 4, 1, 100000), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, 100000), (279, 4, 1, 10**10 % 2**32)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def huge_bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="BMP")
    data = bytearray(buf.getvalue())
    data[18:26] = struct.pack("<ii", 100000, 100000)
    return bytes(data)


def bitflip(rng: random.Random, data: bytes, flips: int = 8) -> bytes:
    out = bytearray(data)
    for _ in range(flips):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "fuzzboundary") -> tuple[bytes, str]:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename:
            out += b"Content-Type: image/jpeg\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


IMG = {"Content-Type": "image/jpeg"}


def hostile(rng: random.Random, max_body: int, max_images: int) -> list[Probe]:
    """One probe of every hostile kind (call repeatedly: each call draws new bytes)."""
    good = jpeg(rng)
    count = "/v1/count"
    bad_expected = urllib.parse.quote(rng.choice(["-1", "1001", "abc", "1.5", "", "1e3", "99999999999", " ", "0x10",
                                                  "３", "1&expected=2"]))
    probes = [
        Probe("random bytes", "POST", count, rng.randbytes(rng.randint(1, 4000)), IMG, frozenset({400})),
        Probe("truncated jpeg", "POST", count, good[: rng.randint(1, len(good) - 20)], IMG, frozenset({400})),
        Probe("truncated png", "POST", count, (noisy := noisy_png(rng))[: rng.randint(30, len(noisy) // 2)], IMG,
              frozenset({400})),
        Probe("bit-flipped jpeg", "POST", count, bitflip(rng, good), IMG, frozenset({200, 400, 413})),
        Probe("bit-flipped png", "POST", count, bitflip(rng, png(120, 90)), IMG, frozenset({200, 400, 413})),
        Probe("huge png header", "POST", count, huge_png(rng.randint(20000, 60000), rng.randint(20000, 60000)),
              {"Content-Type": "image/png"}, frozenset({413})),
        Probe("huge jpeg header", "POST", "/invocations", huge_jpeg(rng), IMG, frozenset({413})),
        Probe("huge gif header", "POST", count, huge_gif(), {"Content-Type": "image/gif"}, frozenset({413})),
        Probe("huge webp header", "POST", count, huge_webp(), {"Content-Type": "image/webp"}, frozenset({400, 413})),
        Probe("huge tiff header", "POST", count, huge_tiff(), {"Content-Type": "image/tiff"}, frozenset({413})),
        Probe("huge bmp header", "POST", count, huge_bmp(), {"Content-Type": "image/bmp"}, frozenset({413})),
        Probe("decompression bomb png", "POST", count, png(3000, 3000, "L"), {"Content-Type": "image/png"},
              frozenset({413})),
        Probe("empty body", "POST", rng.choice([count, "/invocations"]), b"", IMG, frozenset({400})),
        Probe("wrong content type", "POST", count, good,
              {"Content-Type": rng.choice(["text/plain", "application/json", "application/x-www-form-urlencoded"])},
              frozenset({415})),
        Probe("bad expected", "POST", f"{count}?expected={bad_expected}", good, IMG, frozenset({422})),
        Probe("bad expected header", "POST", "/invocations", good,
              {**IMG, "X-Amzn-SageMaker-Custom-Attributes": f"expected={bad_expected}"}, frozenset({422})),
        Probe("multipart without an image", "POST", "/v1/count:batch",
              *_multipart_body([("note", None, b"hello"), ("expected", None, b"3")]), frozenset({400})),
        Probe("oversized body", "POST", count, good + rng.randbytes(max_body + 1000 - len(good)), IMG,
              frozenset({413})),
        Probe("oversized chunked body", "POST", count, rng.randbytes(max_body + 70000), IMG, frozenset({413}),
              chunked=True),
        Probe("oversized kserve batch", "POST", "/v1/models/bincounter:predict",
              json.dumps({"instances": [{"image": {"b64": base64.b64encode(png(8, 8)).decode()}}] * (max_images + 1)})
              .encode(), {"Content-Type": "application/json"}, frozenset({413})),
        Probe("oversized multipart batch", "POST", "/v1/count:batch",
              *_multipart_body([("files", f"{i}.png", png(8, 8)) for i in range(max_images + 1)]), frozenset({413})),
        Probe("kserve garbage", "POST", "/v1/models/bincounter:predict",
              rng.choice([b"{not json", b"[]", b'{"instances": [{"image": {"b64": "%%%"}}]}', b"\xff\xfe",
                          b'{"instances": "x"}', b"[" * 100000]), {"Content-Type": "application/json"},
              frozenset({400})),
        Probe("unsupported format", "POST", count, rng.choice([_ico(), b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n"]),
              IMG, frozenset({400, 415})),
        Probe("unknown path", "POST", rng.choice(["/v1/../etc/passwd", "/%ff%fe", "/v1/count/x", "/admin"]), good, IMG,
              frozenset({404, 405})),
        Probe("wrong method", rng.choice(["GET", "PUT", "DELETE"]), count, None, {}, frozenset({405})),
    ]
    return probes


def _multipart_body(parts) -> tuple[bytes, dict[str, str]]:
    body, content_type = multipart(parts)
    return body, {"Content-Type": content_type}


def _ico() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="ICO")
    return buf.getvalue()


def good(rng: random.Random) -> Probe:
    """A good request on any counting endpoint, with or without ``expected``."""
    data = jpeg(rng)
    expected = rng.choice([None, rng.randint(0, 7)])
    query = f"?expected={expected}" if expected is not None else ""
    kind = rng.choice(["count", "invocations", "kserve", "batch"])
    if kind == "count":
        return Probe("good", "POST", f"/v1/count{query}", data, IMG, frozenset({200}), data, expected)
    if kind == "invocations":
        headers = {**IMG, **({"X-Amzn-SageMaker-Custom-Attributes": f"expected={expected}"} if expected is not None else {})}
        return Probe("good", "POST", "/invocations", data, headers, frozenset({200}), data, expected)
    if kind == "kserve":
        instance = {"image": {"b64": base64.b64encode(data).decode()}}
        if expected is not None:
            instance["expected"] = expected
        return Probe("good", "POST", "/v1/models/bincounter:predict", json.dumps({"instances": [instance]}).encode(),
                     {"Content-Type": "application/json"}, frozenset({200}), data, expected)
    body, headers = _multipart_body([("files", "a.jpg", data)])
    return Probe("good", "POST", f"/v1/count:batch{query}", body, headers, frozenset({200}), data, expected)
