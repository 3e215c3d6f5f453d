"""Stage ``text``: encode every unique caption once, plus the empty caption for CFG.

Per caption the cache stores the token embeddings (L, D), the attention mask (L,) and a pooled
embedding (D,). The key is the caption's hash + the encoder's weight hash + max length + dtype,
so only captions that are new (or a changed encoder) cost an encoder pass.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from ditpipe.cache import TensorCache
from ditpipe.config import TextConfig
from ditpipe.encoders import TextEncoder, caption_hash
from ditpipe.errors import DitpipeError
from ditpipe.io import cache_key, exclusive, read_jsonl, resolve_device, write_json


def text_key(caption: str, encoder_id: str, cfg: TextConfig) -> str:
    return cache_key("text/v1", caption_hash(caption), encoder_id, cfg.max_length, cfg.dtype)


def unique_captions(captions: list[str]) -> list[str]:
    """Distinct captions in first-seen order, with the empty caption (for CFG) first."""
    return list(dict.fromkeys(["", *captions]))


def run(cfg: TextConfig, prepared: str | Path, out_dir: str | Path) -> dict:
    """Encode captions missing from the cache under ``out_dir`` (or whose entry is damaged); write
    ``index.json``. One writer per cache: a second run on it fails naming the first."""
    with exclusive(out_dir):
        return _run(cfg, prepared, out_dir)


def _run(cfg: TextConfig, prepared: str | Path, out_dir: str | Path) -> dict:
    t0 = time.perf_counter()
    prepared, out_dir = Path(prepared), Path(out_dir)
    if not (prepared / "samples.jsonl").exists():
        raise DitpipeError(f"{prepared} has no samples.jsonl: run `ditpipe prepare` first")
    rows = list(read_jsonl(prepared / "samples.jsonl"))
    if not rows:  # pruning against no captions would empty the cache
        raise DitpipeError(f"{prepared}/samples.jsonl holds no samples: nothing to encode, cache left as it is")
    captions = unique_captions([s["caption"] for s in rows])
    device = resolve_device(cfg.device)
    encoder = TextEncoder(cfg.encoder, cfg.max_length, cfg.dtype, device)
    cache = TensorCache(out_dir / "cache", "text")
    cache.clean_temps()
    keys = {c: text_key(c, encoder.identity, cfg) for c in captions}
    todo = [c for c in captions if not cache.valid(keys[c])]
    with tqdm(total=len(todo), desc="text", unit="caption", disable=None) as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            enc = encoder.encode(batch)
            for j, c in enumerate(batch):
                cache.put(keys[c], {k: v[j] for k, v in enc.items()}, {"encoder": encoder.identity})
            bar.update(len(batch))
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
    return {"encoded": len(todo), "cached": len(captions) - len(todo), "unique": len(captions),
            "dim": encoder.dim, "max_length": cfg.max_length, "pruned": pruned, "device": str(device),
            "seconds": round(time.perf_counter() - t0, 2), "out": str(out_dir)}


def summary_line(s: dict) -> str:
    rate = s["encoded"] / s["seconds"] if s["seconds"] else 0.0
    return (f"text: encoded {s['encoded']}, reused {s['cached']} cached of {s['unique']} unique captions "
            f"(incl. empty) -> {s['max_length']}x{s['dim']} on {s['device']} in {s['seconds']}s "
            f"({rate:.0f} captions/s), pruned {s['pruned']} stale -> {s['out']}")
