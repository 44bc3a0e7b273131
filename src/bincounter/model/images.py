"""Photos from anyone, checked before any pixel is decoded, and the evaluation transform in
numpy: what the model server needs of an image, without torch (the serving image has none).

``EvalArrays`` equals ``transforms.EvalTransform`` on decoded photos to within one grey level on a
few pixels (both resize with the same antialiased bilinear filter, Pillow's; the parity test
holds them together), so a served model answers as it was evaluated.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

# Formats a client may send. Everything else Pillow can open (EPS runs Ghostscript, PSD, ICO...)
# is refused before any decoder runs.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000  # as PreprocessConfig.max_pixels: a 7,000 x 5,700 photo


class ImageRejected(ValueError):
    """An image refused before or while decoding; ``status`` is the HTTP answer it deserves."""

    status = 400


class ImageTooLarge(ImageRejected):
    """The header declares more pixels than allowed (decompression bombs)."""

    status = 413


class UnsupportedImage(ImageRejected):
    """A recognised image format that is not accepted."""

    status = 415


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int


def _open(data: bytes, max_pixels: int):
    """Pillow image with only its header read, after the format and pixel checks."""
    from PIL import Image

    if not data:
        raise ImageRejected("empty image")
    with warnings.catch_warnings():
        # We check the pixel count ourselves, with our own limit.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"image is too large: {exc}") from None
        except Image.UnidentifiedImageError:
            raise ImageRejected(f"not a recognisable image (send one of {', '.join(ACCEPTED_FORMATS)})") from None
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for garbage
            raise ImageRejected(f"not a recognisable image ({type(exc).__name__}: {_short(exc)})") from None
    if img.format not in ACCEPTED_FORMATS:
        img.close()
        raise UnsupportedImage(f"image format {img.format} is not accepted (send one of {', '.join(ACCEPTED_FORMATS)})")
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise ImageRejected(f"image declares an empty size {width}x{height}")
    if width * height > max_pixels:
        img.close()
        raise ImageTooLarge(f"image declares {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}")
    return img


def read_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Format and size from the header alone; raises :class:`ImageRejected` (or a subclass)."""
    with _open(data, max_pixels) as img:
        return ImageHeader(img.format, *img.size)


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes from anyone to a uint8 RGB HWC array, refusing anything doubtful.

    The format and declared size are checked from the header before any pixel is decoded;
    Pillow then decodes and raises on truncated data (it never pads a short file). For JPEG
    the pixels equal torchvision's ``decode_image`` (both libjpeg-turbo), which training uses
    on its trusted shards. (torchvision's PNG decoder crashes the process on a truncated PNG
    that declares a huge size.)
    Raises :class:`ImageRejected`: 413 for too many pixels, 415 for formats not accepted, 400
    for anything undecodable.
    """
    with _open(data, max_pixels) as img:
        try:
            rgb = img.convert("RGB")  # loads (decodes) the first frame
        except Exception as exc:  # noqa: BLE001 - truncated, corrupt, unsupported modes...
            raise ImageRejected(f"could not decode the image ({type(exc).__name__}: {_short(exc)})") from None
    with rgb:
        return np.array(rgb)


class EvalArrays:
    """The evaluation transform without torch: the whole photo resized to a square with
    Pillow's antialiased bilinear filter, scaled to [0, 1] and normalised; float32 CHW."""

    def __init__(self, *, size: int, mean: tuple, std: tuple):
        self.size = size
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        from PIL import Image

        with Image.fromarray(rgb) as img:
            small = np.asarray(img.resize((self.size, self.size), Image.Resampling.BILINEAR), dtype=np.float32)
        return (small.transpose(2, 0, 1) / 255.0 - self.mean) / self.std


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[: limit - 3] + "..."


