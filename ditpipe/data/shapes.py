"""``builtin:shapes``: a procedural text-to-image dataset that needs no download.

Each image holds one or two objects on a plain background; the caption names colour, shape and
size, and for two objects their spatial relation ("a small red circle to the left of a large blue
square"). Everything is deterministic from (seed, index), at any resolution, and the ground-truth
attributes travel with every sample so evaluation can judge generated images exactly.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.22, "large": 0.38}  # object side as a fraction of the image side
RELATIONS = ("to the left of", "to the right of", "above", "below")
SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    cx: float  # centre, as a fraction of the image side
    cy: float


@dataclass(frozen=True)
class ShapeScene:
    objects: tuple[ShapeObject, ...]
    relation: str | None  # relation of objects[0] to objects[1]
    background: str

    def caption(self) -> str:
        first = _phrase(self.objects[0])
        if self.relation is None:
            return first
        return f"{first} {self.relation} {_phrase(self.objects[1])}"

    def attributes(self) -> dict:
        return {
            "objects": [asdict(o) for o in self.objects],
            "relation": self.relation,
            "background": self.background,
        }


def _phrase(o: ShapeObject) -> str:
    return f"a {o.size} {o.color} {o.shape}"


def _rand_object(rng: random.Random, xr: tuple[float, float], yr: tuple[float, float], color: str) -> ShapeObject:
    size = rng.choice(tuple(SIZES))
    half = SIZES[size] / 2
    cx = rng.uniform(max(xr[0], half), min(xr[1], 1 - half))
    cy = rng.uniform(max(yr[0], half), min(yr[1], 1 - half))
    return ShapeObject(rng.choice(SHAPES), color, size, round(cx, 4), round(cy, 4))


def sample_scene(seed: int, index: int) -> ShapeScene:
    """The scene of sample ``index``: a pure function of (seed, index)."""
    rng = random.Random(seed * 1_000_003 + index)
    background = rng.choice(tuple(BACKGROUNDS))
    colors = rng.sample(tuple(COLORS), 2)
    if rng.random() < 0.4:
        return ShapeScene((_rand_object(rng, (0, 1), (0, 1), colors[0]),), None, background)
    relation = rng.choice(RELATIONS)
    # The first object sits in the half the relation names, the second in the other half.
    full = (0.0, 1.0)
    regions = {
        "to the left of": (((0.0, 0.5), full), ((0.5, 1.0), full)),
        "to the right of": (((0.5, 1.0), full), ((0.0, 0.5), full)),
        "above": ((full, (0.0, 0.5)), (full, (0.5, 1.0))),
        "below": ((full, (0.5, 1.0)), (full, (0.0, 0.5))),
    }[relation]
    a = _rand_object(rng, *regions[0], colors[0])
    b = _rand_object(rng, *regions[1], colors[1])
    return ShapeScene((a, b), relation, background)


def render(scene: ShapeScene, resolution: int) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``resolution`` x ``resolution``."""
    side = resolution * SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        half = SIZES[o.size] * side / 2
        cx, cy = o.cx * side, o.cy * side
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def key_of(index: int) -> str:
    return f"shapes-{index:07d}"


def draw_sample(seed: int, index: int, resolution: int) -> tuple[str, Image.Image, str, dict]:
    """``(key, image, caption, attributes)`` of sample ``index``: any one can be drawn without the others."""
    scene = sample_scene(seed, index)
    return key_of(index), render(scene, resolution), scene.caption(), scene.attributes()


def generate(seed: int, count: int, resolution: int):
    """Yield ``(key, image, caption, attributes)`` for ``count`` scenes."""
    for i in range(count):
        yield draw_sample(seed, i, resolution)
