"""Stage ``shards``: join latents and caption embeddings into webdataset tar shards.

Each sample is ``<key>.mean.npy``, ``.logvar.npy`` (and ``.mean_flip.npy``/``.logvar_flip.npy``),
``.emb.npy``, ``.mask.npy``, ``.pooled.npy`` and ``.json`` (key, caption, metadata). Arrays are
``.npy`` written with ``allow_pickle=False``: no pickle anywhere. Shards hold at most
``shards.max_samples`` samples and ``shards.max_bytes`` bytes, are written under a temp name and
renamed when whole, and ``index.json`` lists every shard with its sample count, bytes and sha256.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import tempfile
import time
from array import array
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import fsspec
import numpy as np
import torch
import webdataset as wds
from safetensors.torch import save_file
from tqdm import tqdm

from ditpipe.cache import TensorCache, latent_key, text_key
from ditpipe.config import ShardsConfig
from ditpipe.errors import DitpipeError
from ditpipe.io import (
    TMP_PREFIX,
    is_url,
    read_json,
    read_jsonl,
    read_jsonl_offsets,
    scratch_db,
    sha256_file,
    staged_dir,
    write_json,
)

SPLITS = ("train", "val")


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def encode_sample(key: str, latents: dict[str, torch.Tensor], text: dict[str, torch.Tensor], info: dict) -> dict:
    """One webdataset sample: ``__key__`` plus an ``.npy`` member per array and a ``.json``."""
    sample: dict = {"__key__": key}
    for name, t in {**latents, **text}.items():
        sample[f"{name}.npy"] = npy_bytes(t.numpy())
    sample["json"] = json.dumps(info, sort_keys=True, ensure_ascii=False).encode()
    return sample


def sample_bytes(sample: dict) -> int:
    """Bytes a sample takes in a tar: a 512-byte header + data padded to 512 per member, plus a long-name
    header (upper bound) where ``key.ext`` does not fit the 100-byte ustar name field."""
    key = sample["__key__"]
    total = 0
    for ext, data in sample.items():
        if ext == "__key__":
            continue
        total += 512 + -(-len(data) // 512) * 512
        if len(f"{key}.{ext}") >= 100:
            total += 1536
    return total


def tar_file_size(member_bytes: int) -> int:
    """A tar's size on disk: members, two zero end blocks, padded to tarfile's 10240-byte record."""
    return -(-(member_bytes + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class AtomicShardWriter:
    """Writes ``<prefix>-NNNNNN.tar`` shards bounded by count and bytes; each appears only when whole."""

    def __init__(self, out_dir: Path, prefix: str, max_samples: int, max_bytes: int):
        self.out_dir, self.prefix = out_dir, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict] = []
        self._tar: wds.TarWriter | None = None
        self._count = self._bytes = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._name = name
        self._tmp = self.out_dir / f"{TMP_PREFIX}{name}"
        # A fixed integer mtime: byte-identical shards for identical inputs, and no per-member PAX header
        # (a float mtime costs one), which halves the tar parsing the loader does.
        self._tar = wds.TarWriter(str(self._tmp), encoder=False, mtime=0)
        self._count = self._bytes = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.out_dir / self._name
        os.replace(self._tmp, final)
        self.shards.append({"name": self._name, "samples": self._count, "bytes": final.stat().st_size,
                            "sha256": sha256_file(final)})
        self._tar = None

    def write(self, sample: dict) -> None:
        size = sample_bytes(sample)
        if self._tar is not None and (
            self._count >= self.max_samples or tar_file_size(self._bytes + size) > self.max_bytes
        ):
            self._close()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._tar.write(sample)
        self._count += 1
        self._bytes += size

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def ordered_offsets(rows_path: Path, seed: int, work: Path) -> dict[str, array]:
    """File offsets of each split's rows of samples.jsonl in :func:`write_order`'s order, from one pass over the
    file, with 8 bytes per sample in memory: the keys are sorted by SQLite in a file under ``work`` (UTF-8 byte
    order is code point order, as Python sorts), and shuffling the offsets draws the same permutation as
    shuffling the rows."""
    with scratch_db(work, "order") as db:
        db.execute("CREATE TABLE rows (split TEXT, key TEXT, offset INTEGER)")
        db.executemany("INSERT INTO rows VALUES (?, ?, ?)",
                       ((row["split"], row["key"], offset) for offset, row in read_jsonl_offsets(rows_path)))
        order = {split: array("q", (offset for (offset,) in db.execute(
            "SELECT offset FROM rows WHERE split = ? ORDER BY key", (split,)))) for split in SPLITS}
    random.Random(seed).shuffle(order["train"])
    return order


def read_row(f, offset: int) -> dict:
    f.seek(offset)
    return json.loads(f.readline())


def write_order(samples: list[dict], split: str, seed: int) -> list[dict]:
    """Train samples shuffled (each shard a mix), val sorted by key (deterministic evaluation)."""
    rows = sorted((s for s in samples if s["split"] == split), key=lambda s: s["key"])
    if split == "train":
        random.Random(seed).shuffle(rows)
    return rows


def pack(rows: Iterable[dict], writer: AtomicShardWriter, load_latents, load_text) -> Iterator[str]:
    """The core: stream prepared rows into ``writer``; yield each key written."""
    for row in rows:
        info = {"key": row["key"], "caption": row["caption"], "meta": row.get("meta", {})}
        writer.write(encode_sample(row["key"], load_latents(row), load_text(row["caption"]), info))
        yield row["key"]


def run(cfg: ShardsConfig, prepared: str | Path, latents_dir: str | Path, text_dir: str | Path,
        out_dir: str | Path) -> dict:
    """Write train/val shards and ``index.json`` to ``out_dir``: a local folder, or any fsspec URL
    (``s3://bucket/shards``), where they are built in a local temp folder beside ``prepared`` and uploaded."""
    if not is_url(out_dir):
        return _run(cfg, prepared, latents_dir, text_dir, out_dir)
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}shards-upload-", dir=Path(prepared).parent) as local:
        summary = _run(cfg, prepared, latents_dir, text_dir, Path(local) / "shards")
        t0 = time.perf_counter()
        publish(Path(local) / "shards", str(out_dir))
        return {**summary, "out": str(out_dir), "upload_seconds": round(time.perf_counter() - t0, 2)}


def publish(local: Path, url: str) -> None:
    """Upload a finished shards folder to ``url``: every shard first and ``index.json`` last (readers start
    from the index, and check every shard against it), then remove the files an earlier index listed that
    this one does not."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    before = set(fs.ls(root, detail=False)) if fs.exists(root) else set()
    names = sorted(p.name for p in local.iterdir() if p.name != "index.json")
    for name in tqdm(names, desc=f"upload to {url}", unit="file", disable=None):
        fs.put_file(str(local / name), f"{root}/{name}")
    fs.put_file(str(local / "index.json"), f"{root}/index.json")
    for stale in before - {f"{root}/{name}" for name in [*names, "index.json"]}:
        fs.rm_file(stale)


def _run(cfg: ShardsConfig, prepared: str | Path, latents_dir: str | Path, text_dir: str | Path,
         out_dir: str | Path) -> dict:
    t0 = time.perf_counter()
    prepared, latents_dir, text_dir = Path(prepared), Path(latents_dir), Path(text_dir)
    for folder, stage in ((prepared / "samples.jsonl", "prepare"), (latents_dir / "index.json", "latents"),
                          (text_dir / "index.json", "text")):
        if not folder.exists():
            raise DitpipeError(f"{folder} is missing: run `ditpipe {stage}` first")
    rows_path = prepared / "samples.jsonl"
    lat_index, txt_index = read_json(latents_dir / "index.json"), read_json(text_dir / "index.json")
    lat_cache, txt_cache = TensorCache(latents_dir / "cache", "latents"), TensorCache(text_dir / "cache", "text")
    lat_fields = [lat_index[k] for k in ("vae_identity", "resolution", "dtype", "storage_dtype", "flip")]
    txt_fields = [txt_index[k] for k in ("encoder_identity", "max_length", "dtype")]
    total = _check_fresh(read_jsonl(rows_path), lat_fields, txt_fields, lat_cache, txt_cache)

    def load_latents(row: dict) -> dict[str, torch.Tensor]:
        return lat_cache.get(latent_key(row["sha256"], *lat_fields))

    @lru_cache(maxsize=128)  # bounded: train order is shuffled, so a big cache would only grow memory
    def load_text(caption: str) -> dict[str, torch.Tensor]:
        return txt_cache.get(text_key(caption, *txt_fields))

    splits = {}
    bar = tqdm(total=total, desc="shards", unit="sample", disable=None)
    with open(rows_path, "rb") as rows_file, staged_dir(out_dir) as tmp, bar:
        order = ordered_offsets(rows_path, cfg.seed, tmp)  # memory: 8 bytes a sample
        for split in SPLITS:
            writer = AtomicShardWriter(tmp, split, cfg.max_samples, cfg.max_bytes)
            rows = (read_row(rows_file, offset) for offset in order[split])
            for _ in pack(rows, writer, load_latents, load_text):
                bar.update()
            shards = writer.close()
            splits[split] = {"samples": sum(s["samples"] for s in shards), "bytes": sum(s["bytes"] for s in shards),
                             "shards": shards}
        save_file(txt_cache.get(txt_index["empty"]), str(tmp / "empty_caption.safetensors"))
        index = {
            "format": "ditpipe-shards/v1",
            "splits": splits,
            "latents": {k: lat_index[k] for k in ("vae_identity", "scaling_factor", "shift_factor", "resolution",
                                                   "latent_shape", "storage_dtype", "flip")},
            "text": {k: txt_index[k] for k in ("encoder", "encoder_identity", "model_type", "max_length", "dim",
                                               "dtype")},
            "empty_caption": "empty_caption.safetensors",
            "data": read_json(prepared / "meta.json"),
        }
        write_json(tmp / "index.json", index)
    return {"splits": {s: {k: v[k] for k in ("samples", "bytes")} | {"shards": len(v["shards"])}
                       for s, v in splits.items()},
            "seconds": round(time.perf_counter() - t0, 2), "out": str(out_dir)}


def _check_fresh(samples: Iterable[dict], lat_fields: list, txt_fields: list, lat_cache: TensorCache,
                 txt_cache: TensorCache) -> int:
    """Every sample must have its latents and caption embedding; name the first that does not. Returns the count."""
    n = 0
    for s in samples:
        n += 1
        if not lat_cache.has(latent_key(s["sha256"], *lat_fields)):
            raise DitpipeError(f"no latents for sample {s['key']!r}: the latents are stale, run `ditpipe latents`")
        if not txt_cache.has(text_key(s["caption"], *txt_fields)):
            raise DitpipeError(f"no embedding for caption {s['caption']!r}: run `ditpipe text`")
    return n


def summary_line(s: dict) -> str:
    parts = [f"{name} {v['samples']} samples in {v['shards']} shards ({v['bytes'] / 1e6:.1f} MB)"
             for name, v in s["splits"].items()]
    return f"shards: {', '.join(parts)} in {s['seconds']}s -> {s['out']}/index.json"
