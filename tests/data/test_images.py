"""The pure core of prepare: every kind of bad or odd image gives RGB or a named reason."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ditpipe.data.images import NormalizeSpec, Rejected, normalize

SPEC = NormalizeSpec(resolution=32, min_size=16, max_pixels=10_000_000, background="white")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def reason(data: bytes, spec: NormalizeSpec = SPEC) -> str:
    with pytest.raises(Rejected) as exc:
        normalize(data, spec)
    return exc.value.reason


def test_zero_bytes():
    assert reason(b"") == "empty file (0 bytes)"


def test_not_an_image():
    assert reason(b"hello, this is a text file").startswith("not a decodable image")


def test_truncated_png_and_jpeg():
    png = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    assert reason(png[: len(png) // 2]).startswith("corrupt or truncated image")
    jpg = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    assert "truncated" in reason(jpg[: len(jpg) // 2]) or "corrupt" in reason(jpg[: len(jpg) // 2])


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels: a decompression bomb's signature."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (w * 3 + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_before_decoding():
    r = reason(_png_header_only(20_000, 20_000))
    assert r.startswith("decompression bomb")


def test_decompression_bomb_by_our_limit():
    spec = NormalizeSpec(32, 16, max_pixels=64 * 64, background="white")
    r = reason(encode(Image.new("RGB", (100, 100))), spec)
    assert "100x100 = 10000 pixels exceeds data.max_pixels=4096" in r


def test_too_small():
    assert "shorter side below data.min_size=16" in reason(encode(Image.new("RGB", (100, 10))))


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "CMYK", "I", "F", "YCbCr"])
def test_every_mode_becomes_rgb(mode):
    img = Image.effect_noise((40, 40), 80).convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "YCbCr") else "TIFF" if mode in ("I", "F") else "PNG"
    out = normalize(encode(img, fmt), SPEC)
    assert out.mode == "RGB" and out.size == (32, 32)


def test_16bit_png_keeps_its_range():
    arr = np.full((40, 40), 65535, dtype=np.uint16)
    arr[:, :20] = 0
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = np.asarray(normalize(encode(img), SPEC))
    assert out[:, :10].max() == 0 and out[:, -10:].min() == 255  # not clipped to white everywhere


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_over_background(mode):
    img = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    img.paste((255, 0, 0, 255), (0, 0, 20, 40))  # opaque left half
    out = np.asarray(normalize(encode(img.convert(mode)), NormalizeSpec(32, 16, 10**7, "blue")))
    assert tuple(out[16, 28]) == (0, 0, 255)  # background shows through
    left = tuple(out[16, 2])
    assert left == ((255, 0, 0) if mode == "RGBA" else (left[0],) * 3) and left[0] > 50  # opaque part kept


def test_palette_with_transparency():
    img = Image.new("P", (40, 40), 0)
    img.putpalette([255, 0, 0] + [0, 255, 0] * 255)
    img.paste(1, (20, 0, 40, 40))
    img.info["transparency"] = 0
    out = np.asarray(normalize(encode(img, transparency=0), NormalizeSpec(32, 16, 10**7, "white")))
    assert tuple(out[16, 2]) == (255, 255, 255) and tuple(out[16, 30]) == (0, 255, 0)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 30), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 30, 30))  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    out = np.asarray(normalize(encode(img, "JPEG", exif=exif.tobytes(), quality=95), SPEC))
    # displayed upright the image is 30 wide x 60 tall with white on top
    assert out[:8].mean() > 200 and out[-8:].mean() < 50


def test_resize_and_center_crop():
    img = Image.new("RGB", (90, 30), (0, 0, 0))
    img.paste((255, 255, 255), (30, 0, 60, 30))  # white centre third
    out = np.asarray(normalize(encode(img), SPEC))
    assert out.shape == (32, 32, 3) and out.mean() > 240  # the crop kept only the centre
