"""Stage ``text``: encode every unique caption once, plus the empty caption for CFG.

Per caption the cache stores the token embeddings (L, D), the attention mask (L,) and a pooled
embedding (D,). The key is the caption's hash + the encoder's weight hash + max length + dtype,
so only captions that are new (or a changed encoder) cost an encoder pass.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from ditpipe.cache import TensorCache, text_key
from ditpipe.cluster import part_of, run_parts, worker_path
from ditpipe.config import ClusterConfig, TextConfig
from ditpipe.encoders import TextEncoder, caption_hash
from ditpipe.errors import DitpipeError
from ditpipe.io import DiskSet, exclusive, read_jsonl, resolve_device, write_json


def caption_key(caption: str, encoder_id: str, cfg: TextConfig) -> str:
    return text_key(caption, encoder_id, cfg.max_length, cfg.dtype)


def unique_captions(captions: Iterable[str], seen: set[str] | DiskSet) -> Iterator[str]:
    """Distinct captions in first-seen order, with the empty caption (for CFG) first; ``seen`` remembers them
    (a :class:`DiskSet` in the stage, so that millions of captions are not held in memory)."""
    for caption in itertools.chain([""], captions):
        if caption not in seen:
            seen.add(caption)
            yield caption


def _captions(prepared: str | Path) -> Iterator[str]:
    return (row["caption"] for row in read_jsonl(Path(prepared) / "samples.jsonl"))


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

    def todo() -> Iterator[str]:
        with DiskSet(cache_dir, f"captions-part{part}") as seen:
            for c in unique_captions(_captions(prepared), seen):
                if (parts == 1 or part_of(caption_hash(c), parts) == part) and not cache.valid(
                        caption_key(c, encoder.identity, cfg)):
                    yield c

    done, captions = 0, todo()
    with tqdm(desc="text", unit="caption", disable=None if progress else True) as bar:
        while batch := list(itertools.islice(captions, cfg.batch_size)):
            enc = encoder.encode(batch + [""] * (cfg.batch_size - len(batch)))  # one shape: see latents
            for j, c in enumerate(batch):
                cache.put(caption_key(c, encoder.identity, cfg), {k: v[j] for k, v in enc.items()},
                          {"encoder": encoder.identity})
            done += len(batch)
            bar.update(len(batch))
    return done


def _run(cfg: TextConfig, prepared: str | Path, out_dir: str | Path, cluster: ClusterConfig) -> dict:
    t0 = time.perf_counter()
    prepared, out_dir = Path(prepared), Path(out_dir)
    if not (prepared / "samples.jsonl").exists():
        raise DitpipeError(f"{prepared} has no samples.jsonl: run `ditpipe prepare` first")
    if next(read_jsonl(prepared / "samples.jsonl"), None) is None:  # pruning against no captions would empty the cache
        raise DitpipeError(f"{prepared}/samples.jsonl holds no samples: nothing to encode, cache left as it is")
    encoder = _encoder(cfg.encoder, cfg.max_length, cfg.dtype, cfg.device)
    cache = TensorCache(out_dir / "cache", "text")
    cache.clean_temps()
    parts = 1 if cluster.engine == "local" else cluster.parts
    args = [(cfg, worker_path(prepared), worker_path(out_dir / "cache"), part, parts, parts == 1)
            for part in range(parts)]
    encoded = sum(run_parts(cluster, encode_part, args, "text"))
    listing = hashlib.sha256()
    with DiskSet(out_dir / "cache", "captions") as captions, DiskSet(out_dir / "cache", "keep") as keep:
        for c in unique_captions(_captions(prepared), captions):  # streamed: nothing per caption in memory
            keep.add(key := caption_key(c, encoder.identity, cfg))
            listing.update(f"{caption_hash(c)}\t{key}\n".encode())
        pruned = cache.prune(keep)
        unique = len(captions)
    index = {
        "encoder": cfg.encoder,
        "encoder_identity": encoder.identity,
        "model_type": encoder.model_type,
        "max_length": cfg.max_length,
        "dim": encoder.dim,
        "dtype": cfg.dtype,
        "empty": caption_key("", encoder.identity, cfg),
        # entries are found by cache.text_key from a caption and the fields above; the count and the sha256 of
        # the (caption hash, entry) listing say which captions this index covers
        "captions": unique,
        "captions_sha256": listing.hexdigest(),
    }
    write_json(out_dir / "index.json", index)
    return {"encoded": encoded, "cached": unique - encoded, "unique": unique,
            "dim": encoder.dim, "max_length": cfg.max_length, "pruned": pruned,
            "device": str(resolve_device(cfg.device)), "engine": cluster.engine,
            "seconds": round(time.perf_counter() - t0, 2), "out": str(out_dir)}


def summary_line(s: dict) -> str:
    rate = s["encoded"] / s["seconds"] if s["seconds"] else 0.0
    return (f"text: encoded {s['encoded']}, reused {s['cached']} cached of {s['unique']} unique captions "
            f"(incl. empty) -> {s['max_length']}x{s['dim']} on {s['device']} in {s['seconds']}s "
            f"({rate:.0f} captions/s), pruned {s['pruned']} stale -> {s['out']}")
