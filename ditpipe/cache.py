"""A folder of safetensors files keyed by content: the latent and text-embedding caches.

Every entry is written atomically (hidden temp name, then rename), so a run killed at any point
leaves only whole entries behind and a re-run picks up where it stopped. Each entry carries the
sha256 of its tensors in its metadata, checked on every read: a damaged entry is re-encoded by its
stage, and named in an error (never used) by a reader.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Container
from pathlib import Path

import torch
from safetensors.torch import load, save

from ditpipe.errors import DitpipeError
from ditpipe.io import TMP_PREFIX, cache_key, remove_stale_temps, sha256_bytes

DIGEST = "ditpipe.sha256"


def latent_key(sample_sha: str, vae_id: str, resolution: int, dtype: str, storage_dtype: str, flip: bool) -> str:
    """The latents cache entry of a prepared image: its pixel sha256 + the VAE's weight hash + resolution +
    dtypes + flip. ``latents`` writes under it; ``shards`` finds the entry from the row and the index header,
    so no per-sample map is held or written."""
    return cache_key("latents/v1", sample_sha, vae_id, resolution, dtype, storage_dtype, flip)


def text_key(caption: str, encoder_id: str, max_length: int, dtype: str) -> str:
    """The text cache entry of a caption: its sha256 + the encoder's identity + max length + dtype (found by
    ``shards`` from the caption and the text index's fields, like :func:`latent_key`)."""
    return cache_key("text/v1", sha256_bytes(caption.encode("utf-8")), encoder_id, max_length, dtype)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a dict of CPU tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def safetensors_header(data: bytes) -> tuple[int, dict]:
    """(length, parsed JSON) of a safetensors file's header."""
    n = int.from_bytes(data[:8], "little")
    if not 0 < n <= len(data) - 8:
        raise ValueError(f"header length {n} does not fit a file of {len(data)} bytes")
    return n, json.loads(data[8 : 8 + n])


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its metadata in sorted order. safetensors writes metadata from a hash
    map, in an order that changes from one process to the next; sorted, an entry written by a Dask worker
    is byte for byte the one this process writes. The header keeps its length, so no offset moves."""
    n, header = safetensors_header(data)
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= n, "a re-serialised safetensors header grew"
    return data[:8] + text.ljust(n) + data[8 + n :]


class TensorCache:
    """``<root>/<key[:2]>/<key>.safetensors``; values are dicts of CPU tensors."""

    def __init__(self, root: str | Path, stage: str = ""):
        self.root, self.stage = Path(root), stage  # the stage that fills it, named in errors

    def path(self, key: str) -> Path:
        return Path(self._file(key))

    def _file(self, key: str) -> str:
        # a string, not a Path: pathlib interns every file name it parses, one per entry over millions
        return os.path.join(self.root, key[:2], f"{key}.safetensors")

    def has(self, key: str) -> bool:
        return os.path.exists(self._file(key))

    def put(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{TMP_PREFIX}{os.getpid()}-{final.name}")
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        data = save(tensors, metadata={**(metadata or {}), DIGEST: tensors_digest(tensors)})
        with open(tmp, "wb") as f:
            f.write(canonical_safetensors(data))
        os.replace(tmp, final)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """The entry's tensors, checked against the digest it was written with."""
        problem, tensors = self._read(key)
        if problem:
            rerun = f"run `ditpipe {self.stage}` (or `dvc repro {self.stage}`) to rebuild it" if self.stage else ""
            raise DitpipeError(f"cache entry {self.path(key)} is {problem}; {rerun}".rstrip("; "))
        return tensors

    def valid(self, key: str) -> bool:
        """Whether the entry exists and verifies (a stage re-encodes the ones that do not)."""
        return not self._read(key)[0]

    def _read(self, key: str) -> tuple[str, dict[str, torch.Tensor]]:
        # the bytes parsed in memory, not safe_open: it keeps ~100 bytes per file opened, which over millions of
        # entries read by `shards` would grow its memory with the dataset
        try:
            with open(self._file(key), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return "missing", {}
        except OSError as exc:  # a folder or an unreadable file where the entry should be
            return f"damaged ({exc.strerror or type(exc).__name__})", {}
        try:
            digest = (safetensors_header(data)[1].get("__metadata__") or {}).get(DIGEST)
            tensors = load(data)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a cut or bad header
            return f"damaged ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})", {}
        if digest is not None and tensors_digest(tensors) != digest:
            return "damaged (its tensors do not match their sha256)", {}
        return "", tensors

    def keys(self) -> set[str]:
        if not self.root.exists():
            return set()
        return {p.stem for p in self.root.glob("*/*.safetensors") if not p.name.startswith(TMP_PREFIX)}

    def clean_temps(self) -> int:
        """Remove what a killed writer left half-written."""
        return remove_stale_temps(self.root)

    def prune(self, keep: Container[str]) -> int:
        """Delete entries not in ``keep`` (stale VAE or encoder); return how many. ``keep`` may be a
        :class:`~ditpipe.io.DiskSet`: the cache is walked, not listed into memory."""
        gone = 0
        if not self.root.exists():
            return 0
        for path in self.root.glob("*/*.safetensors"):
            if not path.name.startswith(TMP_PREFIX) and path.stem not in keep:
                path.unlink(missing_ok=True)
                gone += 1
        return gone
