"""Stage ``text``: encode every unique caption once, plus the empty caption for CFG.

Per caption the cache stores the token embeddings (L, D), the attention mask (L,) and a pooled
embedding (D,). The key is the caption's hash + the encoder's weight hash + max length + dtype,
so only captions that are new (or a changed encoder) cost an encoder pass.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from ditpipe.cache import TensorCache
from ditpipe.cluster import part_of, run_parts
from ditpipe.config import ClusterConfig, TextConfig
from ditpipe.encoders import TextEncoder, caption_hash
from ditpipe.errors import DitpipeError
from ditpipe.io import cache_key, exclusive, read_jsonl, resolve_device, write_json


def text_key(caption: str, encoder_id: str, cfg: TextConfig) -> str:
    return cache_key("text/v1", caption_hash(caption), encoder_id, cfg.max_length, cfg.dtype)


def unique_captions(captions: Iterable[str]) -> list[str]:
    """Distinct captions in first-seen order, with the empty caption (for CFG) first."""
    return list(dict.fromkeys(itertools.chain([""], captions)))


def run(cfg: TextConfig, prepared: str | Path, out_dir: str | Path, cluster: ClusterConfig | None = None) -> dict:
    """Encode captions missing from the cache under ``out_dir`` (or whose entry is damaged); write
    ``index.json``. One writer per cache: a second run on it fails naming the first. With a Dask
    ``cluster`` the captions go out in parts by caption hash (same cache entries, byte for byte)."""
    with exclusive(out_dir):
        return _run(cfg, prepared, out_dir, cluster or ClusterConfig())


@functools.lru_cache(maxsize=2)
def _encoder(name: str, max_length: int, dtype: str, device: str) -> TextEncoder:
    """The text encoder, loaded once per process (a Dask worker keeps it between parts)."""
    return TextEncoder(name, max_length, dtype, resolve_device(device))


def encode_part(cfg: TextConfig, prepared: str, cache_dir: str, part: int, parts: int,
                progress: bool = False) -> int:
    """Encode the captions of part ``part`` of ``parts`` (by caption hash) that the cache lacks; return how
    many. Paths in, entries out through the cache."""
    encoder = _encoder(cfg.encoder, cfg.max_length, cfg.dtype, cfg.device)
    cache = TensorCache(Path(cache_dir), "text")
    captions = unique_captions(row["caption"] for row in read_jsonl(Path(prepared) / "samples.jsonl"))
    todo = [c for c in captions if (parts == 1 or part_of(caption_hash(c), parts) == part)
            and not cache.valid(text_key(c, encoder.identity, cfg))]
    with tqdm(total=len(todo), desc="text", unit="caption", disable=None if progress else True) as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            enc = encoder.encode(batch)
            for j, c in enumerate(batch):
                cache.put(text_key(c, encoder.identity, cfg), {k: v[j] for k, v in enc.items()},
                          {"encoder": encoder.identity})
            bar.update(len(batch))
    return len(todo)


def _run(cfg: TextConfig, prepared: str | Path, out_dir: str | Path, cluster: ClusterConfig) -> dict:
    t0 = time.perf_counter()
    prepared, out_dir = Path(prepared), Path(out_dir)
    if not (prepared / "samples.jsonl").exists():
        raise DitpipeError(f"{prepared} has no samples.jsonl: run `ditpipe prepare` first")
    if next(read_jsonl(prepared / "samples.jsonl"), None) is None:  # pruning against no captions would empty the cache
        raise DitpipeError(f"{prepared}/samples.jsonl holds no samples: nothing to encode, cache left as it is")
    captions = unique_captions(row["caption"] for row in read_jsonl(prepared / "samples.jsonl"))  # rows streamed
    encoder = _encoder(cfg.encoder, cfg.max_length, cfg.dtype, cfg.device)
    cache = TensorCache(out_dir / "cache", "text")
    cache.clean_temps()
    parts = 1 if cluster.engine == "local" else cluster.parts
    args = [(cfg, str(prepared), str(out_dir / "cache"), part, parts, parts == 1) for part in range(parts)]
    encoded = sum(run_parts(cluster, encode_part, args, "text"))
    keys = {c: text_key(c, encoder.identity, cfg) for c in captions}
    pruned = cache.prune(keys.values())
    index = {
        "encoder": cfg.encoder,
        "encoder_identity": encoder.identity,
        "model_type": encoder.model_type,
        "max_length": cfg.max_length,
        "dim": encoder.dim,
        "dtype": cfg.dtype,
        "empty": keys[""],
        "captions": {caption_hash(c): k for c, k in keys.items()},
    }
    write_json(out_dir / "index.json", index)
    return {"encoded": encoded, "cached": len(captions) - encoded, "unique": len(captions),
            "dim": encoder.dim, "max_length": cfg.max_length, "pruned": pruned,
            "device": str(resolve_device(cfg.device)), "engine": cluster.engine,
            "seconds": round(time.perf_counter() - t0, 2), "out": str(out_dir)}


def summary_line(s: dict) -> str:
    rate = s["encoded"] / s["seconds"] if s["seconds"] else 0.0
    return (f"text: encoded {s['encoded']}, reused {s['cached']} cached of {s['unique']} unique captions "
            f"(incl. empty) -> {s['max_length']}x{s['dim']} on {s['device']} in {s['seconds']}s "
            f"({rate:.0f} captions/s), pruned {s['pruned']} stale -> {s['out']}")
