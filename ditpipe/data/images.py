"""Decode, verify and normalize one image: the pure core of ``prepare``.

Every failure is a :class:`Rejected` with a reason a person can act on; nothing here raises for
bad input and nothing touches the file system.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageColor, ImageOps


class Rejected(Exception):
    """A sample that cannot be used, with the reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class NormalizeSpec:
    resolution: int
    min_size: int
    max_pixels: int
    background: str


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Open, bomb-check and fully decode ``data``; raise :class:`Rejected` on any problem."""
    if not data:
        raise Rejected("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            probe = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise Rejected(f"decompression bomb: {exc}") from None
        except Image.DecompressionBombWarning as exc:
            raise Rejected(f"decompression bomb: {exc}") from None
        except Exception as exc:  # PIL raises many types for garbage input
            # without the object addresses PIL puts in some messages: the report is the same on every run
            why = re.sub(r" ?<[^<>]* at 0x[0-9a-f]+>", "", str(exc))
            raise Rejected(f"not a decodable image: {type(exc).__name__}: {why}") from None
        w, h = probe.size
        if w * h > max_pixels:
            raise Rejected(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds data.max_pixels={max_pixels}")
        try:
            probe.verify()  # checksums and structure, without decoding pixels
            img = Image.open(io.BytesIO(data))
            img.load()  # decodes every pixel: truncated data fails here
        except Exception as exc:
            raise Rejected(f"corrupt or truncated image: {type(exc).__name__}: {exc}") from None
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel modes to 8-bit L, keeping the full range."""
    arr = np.asarray(img)
    if img.mode == "F":
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0
    else:
        arr = arr.astype(np.int64) >> 8 if arr.max() > 255 else arr
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image, background: str) -> Image.Image:
    """Any PIL mode to RGB; transparency composited over ``background``."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("L", "1") and "transparency" in img.info:
        img = img.convert("LA")
    elif img.mode == "RGB" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        base = Image.new("RGBA", img.size, ImageColor.getrgb(background) + (255,))
        return Image.alpha_composite(base, img).convert("RGB")
    return img.convert("RGB")


def normalize(data: bytes, spec: NormalizeSpec) -> Image.Image:
    """Bytes of any image file to an RGB ``resolution``-square image, or :class:`Rejected`."""
    img = decode(data, spec.max_pixels)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:
        raise Rejected(f"bad EXIF orientation data: {type(exc).__name__}: {exc}") from None
    if min(img.size) < spec.min_size:
        raise Rejected(f"too small: {img.size[0]}x{img.size[1]}, shorter side below data.min_size={spec.min_size}")
    rgb = to_rgb(img, spec.background)
    r = spec.resolution
    return ImageOps.fit(rgb, (r, r), Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
