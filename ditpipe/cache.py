"""A folder of safetensors files keyed by content: the latent and text-embedding caches.

Every entry is written atomically (hidden temp name, then rename), so a run killed at any point
leaves only whole entries behind and a re-run picks up where it stopped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ditpipe.io import TMP_PREFIX, remove_stale_temps


class TensorCache:
    """``<root>/<key[:2]>/<key>.safetensors``; values are dicts of CPU tensors."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def put(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{TMP_PREFIX}{os.getpid()}-{final.name}")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, final)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(key)))

    def keys(self) -> set[str]:
        if not self.root.exists():
            return set()
        return {p.stem for p in self.root.glob("*/*.safetensors") if not p.name.startswith(TMP_PREFIX)}

    def clean_temps(self) -> int:
        """Remove what a killed writer left half-written."""
        return remove_stale_temps(self.root)

    def prune(self, keep: Iterable[str]) -> int:
        """Delete entries not in ``keep`` (stale VAE or encoder); return how many."""
        keep = set(keep)
        gone = 0
        for key in self.keys() - keep:
            self.path(key).unlink(missing_ok=True)
            gone += 1
        return gone
