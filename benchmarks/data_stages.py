"""Benchmarks of the data stages, each against a baseline measured in the same run.

    python benchmarks/data_stages.py                 # all three, default sizes
    python benchmarks/data_stages.py --only loader   # one of: encode, loader, memory

1. encode: latents (images/s) and text (captions/s), batched as the stages do it vs a per-sample loop.
2. loader: samples/s and MB/s from the shards vs the same arrays from memory and from one .npy per sample.
   At ~1 MB samples (T5-sized caption embeddings): memory-mapped vs streamed shards vs .npy files.
   resume: time to the first sample of a resume 10.5 epochs in, skipping by index counts vs reading to skip.
   cluster: prepare, latents and text in-process vs as parts on a 2-worker local Dask cluster (--only cluster).
3. memory: peak RSS of `ditpipe prepare`, `latents`, `text` and `shards` by dataset size (must not grow);
   shards-memory: `shards` alone on synthetic cached inputs, quick at 100k samples.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ditpipe.loader as loader_mod  # noqa: E402
from ditpipe.autoencoder import PreparedImages, load_vae  # noqa: E402
from ditpipe.config import load_config  # noqa: E402
from ditpipe.encoders import TextEncoder  # noqa: E402
from ditpipe.latents import encode_batch  # noqa: E402
from ditpipe.loader import collate, make_loader, shard_entries  # noqa: E402
from ditpipe.stages import run_stage  # noqa: E402


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:9.1f}/s"


def build(work: Path, count: int) -> object:
    """Run prepare..shards on `count` shapes in `work` with the default params."""
    cfg = load_config(None, [f"data.count={count}", "vae.steps=50"] +
                      [f"paths.{k}={work / k}" for k in ("prepared", "vae", "latents", "text", "shards")])
    for stage in ("prepare", "vae", "latents", "text", "shards"):
        run_stage(stage, cfg)
    return cfg


def bench_encode(cfg, n_images: int = 512, n_captions: int = 256) -> None:
    print("\n== encode: batched (as the stages run) vs one sample at a time")
    vae = load_vae(cfg.paths.vae).eval()
    imgs = PreparedImages(cfg.paths.prepared, None)
    x = torch.stack([imgs[i] for i in range(min(n_images, len(imgs)))])
    t = time.perf_counter()
    for i in range(0, len(x), cfg.latents.batch_size):
        encode_batch(vae, x[i : i + cfg.latents.batch_size], False)
    batched = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(len(x)):
        encode_batch(vae, x[i : i + 1], False)
    loop = time.perf_counter() - t
    print(f"latents  batched {rate(len(x), batched)}  per-sample {rate(len(x), loop)}  speed-up {loop / batched:.1f}x"
          f"  ({len(x)} images, batch {cfg.latents.batch_size})")
    enc = TextEncoder(cfg.text.encoder, cfg.text.max_length, cfg.text.dtype, torch.device("cpu"))
    caps = [f"a small red circle number {i}" for i in range(n_captions)]
    t = time.perf_counter()
    for i in range(0, len(caps), cfg.text.batch_size):
        enc.encode(caps[i : i + cfg.text.batch_size])
    batched = time.perf_counter() - t
    t = time.perf_counter()
    for c in caps:
        enc.encode([c])
    loop = time.perf_counter() - t
    print(f"text     batched {rate(len(caps), batched)}  per-sample {rate(len(caps), loop)}  speed-up "
          f"{loop / batched:.1f}x  ({len(caps)} captions, batch {cfg.text.batch_size})")


ARRAYS = ("mean", "logvar", "emb", "mask", "pooled")


def _timed(batches) -> tuple[int, int, float]:
    """(samples, bytes, seconds) to drain an iterable of batches."""
    t, n, nbytes = time.perf_counter(), 0, 0
    for b in batches:
        n += len(b["key"])
        nbytes += sum(b[k].numel() * b[k].element_size() for k in ARRAYS)
    return n, nbytes, time.perf_counter() - t


def _stacked(samples: list[dict], batch_size: int):
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        batch = {k: torch.from_numpy(np.stack([a[k] for a in chunk])) for k in ARRAYS}
        yield {**batch, "key": [None] * len(chunk)}


def bench_loader(cfg, batch_size: int = 64) -> None:
    print("\n== loader: one epoch from shards vs the same arrays from memory and from one .npy per array")

    def line(name: str, n: int, nbytes: int, s: float, note: str) -> None:
        print(f"{name:12} {rate(n, s)}  {nbytes / 1e6 / s:8.1f} MB/s  ({note})")

    for workers in (0, 2):
        loader = make_loader(cfg.paths.shards, "train", batch_size, num_workers=workers, infinite=False)
        line("shards", *_timed(loader), f"DataLoader workers {workers}, shuffle buffer 1000")
    # What verifying each shard (size + sha256 before use) costs in a first epoch, against the same loader
    # with the check off; later epochs skip the hash (verified once per process).
    for verify in (False, True, False, True):
        loader.dataset.expect = shard_entries(cfg.paths.shards, "train") if verify else {}
        loader_mod._VERIFIED.clear()
        loader = DataLoader(loader.dataset, batch_size=batch_size, collate_fn=collate, drop_last=True)
        line("verified" if verify else "unverified", *_timed(loader), "workers 0, first epoch, cold verify")
    samples = [{k: b[k][j].numpy() for k in ARRAYS}
               for b in make_loader(cfg.paths.shards, "train", batch_size, infinite=False)
               for j in range(len(b["key"]))]
    line("memory", *_timed(_stacked(samples, batch_size)), "stacking in-memory arrays: the ceiling")
    with tempfile.TemporaryDirectory() as d:
        for i, a in enumerate(samples):
            for k, v in a.items():
                np.save(f"{d}/{i:07d}.{k}.npy", v)
        order = np.random.default_rng(0).permutation(len(samples))
        reread = ({k: np.load(f"{d}/{j:07d}.{k}.npy") for k in ARRAYS} for j in order)
        note = f"{len(ARRAYS)} files per sample, shuffled, page cache warm"
        line("npy files", *_timed_files(reread, batch_size), note)


def bench_cache_verify(cfg) -> None:
    """Reading every latents cache entry with and without the sha256 check of its tensors."""
    from safetensors.torch import load_file

    from ditpipe.cache import TensorCache

    print("\n== cache entries: plain safetensors load vs verified get (tensors against their sha256)")
    cache = TensorCache(Path(cfg.paths.latents) / "cache", "latents")
    keys = sorted(cache.keys())
    for _ in range(2):
        t = time.perf_counter()
        for k in keys:
            load_file(str(cache.path(k)))
        plain = time.perf_counter() - t
        t = time.perf_counter()
        for k in keys:
            cache.get(k)
        verified = time.perf_counter() - t
        print(f"{len(keys)} entries: plain {plain * 1e3:.0f} ms, verified {verified * 1e3:.0f} ms "
              f"({(verified - plain) / len(keys) * 1e6:+.0f} us per entry)")


def bench_big_samples(n: int = 1000, batch_size: int = 32) -> None:
    """The loader at the sample size of T5-conditioned training: 120 x 4096 fp16 caption embeddings and 4x32x32
    latents, about 1 MB per sample, from local shards (page cache warm), one process (workers 0)."""
    from ditpipe.io import write_json
    from ditpipe.shards import AtomicShardWriter, encode_sample

    print(f"\n== loader at ~1 MB samples ({n}, T5-sized embeddings), workers 0: memory-mapped vs streamed vs npy files")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        writer = AtomicShardWriter(Path(d), "train", 10**9, 64_000_000)
        emb = torch.from_numpy(rng.standard_normal((120, 4096)).astype(np.float16))
        for i in range(n):
            writer.write(encode_sample(
                f"s{i:07d}", {"mean": torch.randn(4, 32, 32), "logvar": torch.randn(4, 32, 32)},
                {"emb": emb, "mask": torch.ones(120, dtype=torch.uint8), "pooled": torch.randn(4096).half()},
                {"key": f"s{i:07d}", "caption": "", "meta": {}}))
        shards = writer.close()
        write_json(Path(d) / "index.json", {"splits": {"train": {"samples": n, "shards": shards}}})

        def epoch(note: str, verify: bool) -> None:
            if verify:
                loader_mod._VERIFIED.clear()
            loader = make_loader(d, "train", batch_size, infinite=False)
            k, nbytes, s = _timed(loader)
            print(f"{note:34} {rate(k, s)}  {nbytes / 1e6 / s:8.1f} MB/s")

        local = loader_mod.LocalFileSystem
        for _ in range(2):
            loader_mod.LocalFileSystem = type("NotLocal", (), {})  # every URL takes the streaming path
            epoch("streamed (webdataset), later epoch", False)
            loader_mod.LocalFileSystem = local
            epoch("memory-mapped, later epoch", False)
            epoch("memory-mapped, first epoch (sha256)", True)
        samples = [{k: b[k][j].numpy() for k in ARRAYS} for b in make_loader(d, "train", batch_size, infinite=False)
                   for j in range(len(b["key"]))]
        with tempfile.TemporaryDirectory() as files:
            for i, a in enumerate(samples):
                for k, v in a.items():
                    np.save(f"{files}/{i:07d}.{k}.npy", v)
            order = np.random.default_rng(0).permutation(len(samples))  # the loader drops the last partial batch
            del samples
            k, nbytes, s = _timed_files(({k: np.load(f"{files}/{j:07d}.{k}.npy") for k in ARRAYS} for j in order),
                                        batch_size)
            print(f"{'npy files (5 per sample), shuffled':34} {rate(k, s)}  {nbytes / 1e6 / s:8.1f} MB/s")


def bench_cluster(cfg) -> None:
    """prepare, latents and text: in this process vs as 16 parts on a local Dask cluster of 2 workers (1 torch
    thread each); latents and text into empty caches, then again with every entry cached (what each part costs
    when it has nothing to do). Each pair's outputs are compared byte for byte."""
    import shutil

    from ditpipe.config import ClusterConfig
    from ditpipe.latents import run as latents
    from ditpipe.prepare import run as prepare
    from ditpipe.text import run as text

    print("\n== data stages: in-process vs a local Dask cluster (2 workers, 16 parts), empty caches, then cached")
    dask = ClusterConfig(engine="dask", workers=2, parts=16)
    stages = (("prepare", lambda out, c: prepare(cfg.data, out, c), "accepted"),
              ("latents", lambda out, c: latents(cfg.latents, cfg.paths.prepared, cfg.paths.vae, out, c), "encoded"),
              ("text", lambda out, c: text(cfg.text, cfg.paths.prepared, out, c), "encoded"))
    with tempfile.TemporaryDirectory() as d:
        for stage, fn, count in stages:
            outs = []
            for name, engine in (("in-process", ClusterConfig()), ("dask 2 workers", dask)):
                out = Path(d) / f"{stage}-{name}"
                cold = fn(out, engine)
                again = ""
                if stage != "prepare":
                    warm = fn(out, engine)["seconds"]
                    parts = engine.parts if engine.engine == "dask" else 1
                    again = f"; all cached: {warm:5.2f} s ({warm / parts * 1e3:4.0f} ms a part with nothing to do)"
                print(f"{stage:8} {name:15} {cold[count]:5d} {count} in {cold['seconds']:6.2f} s{again}")
                outs.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()})
            print(f"{stage:8} outputs byte for byte the same: {outs[0] == outs[1]} ({len(outs[0])} files)")
            shutil.rmtree(Path(d) / f"{stage}-in-process"), shutil.rmtree(Path(d) / f"{stage}-dask 2 workers")


def bench_resume(cfg, epochs: float = 10.5) -> None:
    """Time to the first sample of a resume deep into training: read-and-drop vs skipping by the index."""
    from ditpipe.loader import ShardStream

    print(f"\n== resume: first sample after skipping {epochs} epochs, reading to skip vs skipping by index counts")
    entries = shard_entries(cfg.paths.shards, "train")
    skip = int(epochs * sum(e["samples"] for e in entries.values()))
    for guided in (False, True, False, True):
        stream = ShardStream(list(entries), expect=entries if guided else {}, infinite=True, shuffle_buffer=1000)
        loader_mod._VERIFIED.clear()
        t = time.perf_counter()
        next(stream.raw_samples(0, 1, skip))
        print(f"{'by index' if guided else 'read to skip':13} {time.perf_counter() - t:7.3f} s to the first sample "
              f"after {skip} ({len(entries)} shards)")


def _timed_files(reread, batch_size: int) -> tuple[int, int, float]:
    t = time.perf_counter()
    samples = list(reread)  # the reads are what is timed here
    n, nbytes, _ = _timed(_stacked(samples, batch_size))
    return n, nbytes, time.perf_counter() - t


def peak_rss_mb(stage: str, params: Path, cwd: Path) -> float:
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child forked from this big process reports our size
    code = ("import re, sys; from ditpipe.cli import main; rc = main(sys.argv[1:]); "
            "print('MAXRSS', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, stage, "--params", str(params)], cwd=cwd, check=True,
                         capture_output=True, text=True).stdout
    return int(out.split("MAXRSS")[1]) / 1024


def bench_memory(sizes: list[int], stages: tuple[str, ...] = ("prepare", "latents", "text", "shards")) -> None:
    print("\n== memory: peak RSS of each per-sample data stage by dataset size (MB)")
    print(f"{'samples':>8}  " + "  ".join(f"{s:>8}" for s in stages))
    order = ("prepare", "vae", "latents", "text", "shards")
    last = max(order.index(s) for s in stages)
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            params = Path(d) / "params.yaml"
            params.write_text(yaml.safe_dump({"data": {"count": n}, "vae": {"steps": 5}}))
            peaks = {}
            for stage in order[: last + 1]:
                if stage in stages:
                    peaks[stage] = peak_rss_mb(stage, params, Path(d))
                else:  # not measured (the vae is not per-sample: trained for 5 steps only so that latents has one)
                    subprocess.run([sys.executable, "-m", "ditpipe", stage, "--params", str(params)], cwd=d,
                                   check=True, capture_output=True)
            print(f"{n:8d}  " + "  ".join(f"{peaks[s]:8.1f}" for s in stages), flush=True)


SHARDS_CHILD = """
import re, sys
from pathlib import Path
from ditpipe.cache import TensorCache
from ditpipe.config import ShardsConfig
from ditpipe.shards import run
if sys.argv[2] == "safe_open":  # the reader before: safe_open keeps ~100 bytes per file it opens
    from safetensors import safe_open
    def read(self, key):
        with safe_open(str(self.path(key)), "pt") as f:
            return "", {k: f.get_tensor(k) for k in f.keys()}
    TensorCache._read = read
d = Path(sys.argv[1])
run(ShardsConfig(), d / "prepared", d / "latents", d / "text", d / f"shards-{sys.argv[2]}")
print("MAXRSS", re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
"""


def bench_shards_memory(sizes: list[int]) -> None:
    """Peak RSS of ``shards`` alone on synthetic inputs (tiny cached latents, 50 captions): the per-sample
    stage that reads every cache entry, at sizes the full memory benchmark takes an hour to reach on 2 cores;
    against the same run reading entries through ``safe_open``, as the cache did before."""
    import hashlib
    import json

    from ditpipe.cache import TensorCache, latent_key, text_key
    from ditpipe.io import write_json

    print("\n== memory: peak RSS of `shards` on synthetic cached inputs (MB), entries read from bytes vs safe_open")
    print(f"{'samples':>8}  {'bytes':>8}  {'safe_open':>9}")
    lat_fields, txt_fields = ["vae", 32, "float32", "float32", False], ["enc", 32, "float32"]
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            lat, txt = TensorCache(d / "latents" / "cache"), TensorCache(d / "text" / "cache")
            captions = [f"caption {i}" for i in range(50)]
            for c in [*captions, ""]:
                txt.put(text_key(c, *txt_fields), {"emb": torch.zeros(32, 8), "mask": torch.ones(32, dtype=torch.uint8),
                                                   "pooled": torch.zeros(8)})
            (d / "prepared").mkdir()
            with open(d / "prepared" / "samples.jsonl", "w") as f:
                for i in range(n):
                    sha = hashlib.sha256(str(i).encode()).hexdigest()
                    zeros = torch.zeros(8, 4, 4)
                    lat.put(latent_key(sha, *lat_fields), {"mean": zeros, "logvar": zeros.clone()})
                    f.write(json.dumps({"key": f"s{i:08d}", "file": "-", "caption": captions[i % 50], "sha256": sha,
                                        "split": "val" if i % 20 == 0 else "train", "meta": {}}) + "\n")
            write_json(d / "prepared" / "meta.json", {"source": "synthetic", "count": n})
            write_json(d / "latents" / "index.json", dict(zip(
                ("vae_identity", "resolution", "dtype", "storage_dtype", "flip"), lat_fields),
                scaling_factor=1.0, shift_factor=None, latent_shape=[8, 4, 4]))
            write_json(d / "text" / "index.json", dict(
                zip(("encoder_identity", "max_length", "dtype"), txt_fields),
                encoder="-", model_type="bert", dim=8, empty=text_key("", *txt_fields)))
            peaks = [int(subprocess.run([sys.executable, "-c", SHARDS_CHILD, str(d), how], check=True, text=True,
                                        capture_output=True).stdout.split("MAXRSS")[1]) / 1024
                     for how in ("bytes", "safe_open")]
            print(f"{n:8d}  {peaks[0]:8.1f}  {peaks[1]:9.1f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("encode", "loader", "memory", "shards-memory", "cluster"))
    p.add_argument("--count", type=int, default=2000, help="shapes for the encode/loader benchmarks")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="dataset sizes for memory")
    p.add_argument("--stages", nargs="+", default=["prepare", "latents", "text", "shards"],
                   choices=("prepare", "latents", "text", "shards"), help="the stages memory measures")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    if args.only in (None, "encode", "loader", "cluster"):
        with tempfile.TemporaryDirectory() as d:
            cfg = build(Path(d), args.count)
            if args.only in (None, "encode"):
                bench_encode(cfg)
            if args.only in (None, "loader"):
                bench_loader(cfg)
                bench_cache_verify(cfg)
                bench_resume(cfg)
            if args.only in (None, "loader"):
                bench_big_samples()
            if args.only in (None, "cluster"):
                bench_cluster(cfg)
    if args.only in (None, "memory"):
        bench_memory(args.sizes, tuple(args.stages))
    if args.only in (None, "shards-memory"):
        bench_shards_memory(args.sizes)


if __name__ == "__main__":
    main()
