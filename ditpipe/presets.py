"""Model size presets, light enough for config checking (no torch import)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ditpipe.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    depth: int
    hidden_size: int
    num_heads: int
    unet_channels: tuple[int, ...]


# DiT's S/B/L/XL, plus three for CPUs: XS (about 4M parameters with cross-attention), XXS (about 1.3M, the small
# end of `ditpipe compare` on a CPU) and T (tests).
PRESETS: dict[str, Preset] = {
    "T": Preset(2, 32, 2, (32, 32)),
    "XXS": Preset(4, 128, 4, (32, 64)),
    "XS": Preset(6, 192, 3, (64, 128)),
    "S": Preset(12, 384, 6, (128, 256, 256)),
    "B": Preset(12, 768, 12, (192, 384, 768)),
    "L": Preset(24, 1024, 16, (256, 512, 1024, 1024)),
    "XL": Preset(28, 1152, 16, (320, 640, 1280, 1280)),
}
PATCHES = (1, 2, 4, 8)


def parse_size(size: str) -> tuple[Preset, int]:
    """``"S/2"`` to (preset, patch)."""
    m = re.fullmatch(r"([A-Z]+)/(\d+)", size)
    if not m or m.group(1) not in PRESETS or int(m.group(2)) not in PATCHES:
        known = ", ".join(f"{k}/{p}" for k in PRESETS for p in (2, 4, 8))
        raise ConfigError(f"model.size must be PRESET/PATCH, one of {known}; got {size!r}")
    return PRESETS[m.group(1)], int(m.group(2))


