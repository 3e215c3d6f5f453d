"""Sample grids: images in rows, each with its prompt written under it, small images enlarged."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def caption_grid(images: Sequence[Image.Image], captions: Sequence[str], cols: int | None = None,
                 cell: int = 160, font_size: int = 12, title: str = "") -> Image.Image:
    """A grid of ``images`` (enlarged with nearest-neighbour to ``cell`` px) with each caption beneath."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    n = len(images)
    cols = cols or max(1, min(n, math.ceil(math.sqrt(n))))
    rows = max(1, math.ceil(n / cols))
    font = ImageFont.load_default(size=font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(c, font, cell - 8, probe) for c in captions]
    line_h = font_size + 3
    text_h = line_h * max((len(w) for w in wrapped), default=1) + 6
    title_h = line_h + 8 if title else 0
    grid = Image.new("RGB", (cols * cell, title_h + rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((6, 4), title, fill="black", font=font)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % cols) * cell, title_h + (i // cols) * (cell + text_h)
        grid.paste(img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 4, y + cell + 3 + j * line_h), line, fill="black", font=font)
    return grid
