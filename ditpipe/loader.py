"""Shards to training batches.

:class:`ShardStream` reads the tars with webdataset's tar iterator, splits the work by rank and
DataLoader worker, shuffles through a bounded buffer and decodes ``.npy`` members with
``allow_pickle=False``. Each shard is checked against its ``index.json`` entry (bytes and sha256, once per
process; the sample count on every pass) before any of it is used: a damaged or cut shard is an error
that names it, never training data. For training it runs forever, one reshuffled epoch after another; for
validation it makes one pass in a fixed order. Within an epoch every sample goes to exactly one
(rank, worker): by shard when there are enough shards, by sample index when there are not.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import math
import mmap
import operator
import os
import random
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ditpipe.errors import DitpipeError

ARRAYS = ("mean", "logvar", "mean_flip", "logvar_flip", "emb", "mask", "pooled")


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran order, data offset) of an .npy header; headers repeat, parse each once."""
    f = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)  # a literal_eval: slow, hence the cache
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    return dtype, shape, fortran, f.tell()


def load_npy(data: bytes) -> np.ndarray:
    """``np.load(..., allow_pickle=False)`` for one in-memory .npy, without re-parsing repeated headers."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy member")
    major = data[6]
    size_bytes = 2 if major == 1 else 4
    hlen = int.from_bytes(data[8 : 8 + size_bytes], "little")
    dtype, shape, fortran, offset = _npy_header(bytes(data[: 8 + size_bytes + hlen]))
    arr = np.frombuffer(data, dtype=dtype, offset=offset, count=math.prod(shape))
    return arr.reshape(shape, order="F" if fortran else "C")


def decode(sample: dict) -> dict:
    """Raw tar members to arrays and metadata; never unpickles."""
    out: dict = {"__key__": sample["__key__"]}
    for name, data in sample.items():
        if name.endswith(".npy"):
            out[name[:-4]] = load_npy(data)
        elif name == "json":
            out["info"] = json.loads(bytes(data))
    return out


def collate(samples: list[dict]) -> dict:
    """Stack arrays into tensors; keep keys and captions as lists."""
    batch: dict = {"key": [s["__key__"] for s in samples], "caption": [s["info"]["caption"] for s in samples]}
    for name in ARRAYS:
        if name in samples[0]:
            batch[name] = torch.from_numpy(np.stack([s[name] for s in samples]))
    return batch


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else the launcher's env vars."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


_VERIFIED: set[tuple[str, str]] = set()  # (url, sha256) this process has checked: later epochs skip the hash
REBUILD = "re-run `ditpipe shards` (or `dvc repro shards`; `dvc checkout` if DVC has them cached)"


def verify_shard(url: str, expect: dict, chunk: int = 1 << 22) -> None:
    """Check a shard's size and sha256 against its ``index.json`` entry before a byte of it is used."""
    if (url, expect["sha256"]) in _VERIFIED:
        return
    h, size = hashlib.sha256(), 0
    try:
        fs, path = fsspec.core.url_to_fs(url)
        with fs.open(path, "rb") as f:
            if isinstance(fs, LocalFileSystem) and (size := os.fstat(f.fileno()).st_size):
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    h.update(mapped)  # one call without the GIL, no copies: ~15% faster than reading blocks
            else:
                while block := f.read(chunk):
                    h.update(block)
                    size += len(block)
    except FileNotFoundError:
        raise DitpipeError(f"shard {url} is missing: {REBUILD}") from None
    if size != expect["bytes"]:
        raise DitpipeError(f"shard {url} is damaged: {size} bytes, index.json says {expect['bytes']}: {REBUILD}")
    if h.hexdigest() != expect["sha256"]:
        raise DitpipeError(f"shard {url} is damaged: its sha256 differs from index.json's: {REBUILD}")
    _VERIFIED.add((url, expect["sha256"]))


def verified_in_turn(urls: list[str], expect: dict[str, dict]) -> Iterator[str]:
    """Each url once it has verified; the next one is hashed in a thread while the caller reads this one
    (hashlib and file reads release the GIL), so the check costs wall time only for the first shard."""
    with ThreadPoolExecutor(1, thread_name_prefix="verify-shard") as pool:
        def ahead(i: int) -> Future | None:
            return pool.submit(verify_shard, urls[i], expect[urls[i]]) if i < len(urls) and urls[i] in expect else None

        pending = ahead(0)
        for i, url in enumerate(urls):
            current, pending = pending, ahead(i + 1)
            if current is not None:
                current.result()
            yield url


_END = bytes(512)


def plain_members(view: memoryview) -> list[tuple[str, int, int]] | None:
    """``(name, data offset, size)`` of each member of a tar made only of plain ustar regular files (what
    ``shards`` writes), read straight from its 512-byte headers: ``tarfile`` spends ~0.4 ms a sample
    decoding them, a third of an epoch at 1 MB samples. None at anything else (PAX or long-name headers,
    links, a bad checksum, a member cut short, no end block): ``tarfile`` then reads the shard, and names
    what is wrong with it."""
    members, pos, size = [], 0, len(view)
    while pos + 512 <= size:
        header = bytes(view[pos : pos + 512])
        if header == _END:
            return members
        try:
            checksum = int(header[148:156].split(b"\0", 1)[0].strip(), 8)
            length = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode()
        except ValueError:  # also a non-UTF-8 name (UnicodeDecodeError)
            return None
        if (header[257:263] != b"ustar\0" or header[156:157] not in (b"0", b"\0") or header[124] & 0x80
                or checksum != sum(header[:148]) + 256 + sum(header[156:])):
            return None
        start = pos + 512
        if start + length > size:
            return None
        members.append((f"{prefix}/{name}" if prefix else name, start, length))
        pos = start + -(-length // 512) * 512
    return None


def mapped_members(path: str) -> Iterator[dict]:
    """``{fname, data}`` of each regular file in a local tar, ``data`` a zero-copy view of a memory map: the
    arrays are never copied until they are batched. Headers are parsed by :func:`plain_members`, or by
    ``tarfile`` for any other tar."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise DitpipeError(f"shard {path} is empty: {REBUILD}")
        view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))  # unmapped once no array uses it
        plain = plain_members(view)
        if plain is not None:
            for name, start, length in plain:
                yield {"fname": name, "data": view[start : start + length]}
            return
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                if info.offset_data + info.size > size:
                    raise DitpipeError(f"shard {path} is cut short inside {info.name}: {REBUILD}")
                yield {"fname": info.name, "data": view[info.offset_data : info.offset_data + info.size]}
                tar.members = []  # keep no headers: memory stays flat whatever the shard size


def read_tar(url: str, expect: dict | None = None) -> Iterator[dict]:
    """The samples of one tar (members as bytes-like objects); with ``expect`` (its index entry) the shard
    is verified first, and its sample count after. Local shards are memory-mapped, any other fsspec URL is
    streamed through webdataset's tar reader."""
    if expect is not None:
        verify_shard(url, expect)
    n = 0
    try:
        fs, path = fsspec.core.url_to_fs(url)
        with contextlib.ExitStack() as stack:
            if isinstance(fs, LocalFileSystem):
                members = mapped_members(path)
            else:
                members = tar_file_iterator(stack.enter_context(fs.open(path, "rb")))
            for sample in group_by_keys({**member, "__url__": url} for member in members):
                sample.pop("__url__", None)
                n += 1
                yield sample
    except FileNotFoundError:
        raise DitpipeError(f"shard {url} is missing: {REBUILD}") from None
    except tarfile.TarError as exc:
        raise DitpipeError(f"shard {url} is damaged ({exc}): {REBUILD}") from None
    if expect is not None and n != expect["samples"]:
        raise DitpipeError(f"shard {url} holds {n} samples, index.json says {expect['samples']}: {REBUILD}")


class ShardStream(IterableDataset):
    """Samples from shard ``urls`` for one rank; infinite and reshuffled per epoch, or one ordered pass."""

    def __init__(self, urls: list[str], *, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0,
                 seed: int = 0, infinite: bool = False, skip_batches: int = 0, batch_size: int = 1,
                 expect: dict[str, dict] | None = None):
        if not urls:
            raise DitpipeError("no shards to read")
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.expect = expect or {}  # url -> its index.json entry (samples, bytes, sha256): verified on read
        self.shuffle_buffer, self.seed, self.infinite = shuffle_buffer, seed, infinite
        self.skip_batches, self.batch_size = skip_batches, batch_size

    def samples_to_skip(self, worker: int, num_workers: int) -> int:
        """Samples this worker already delivered, when this rank has consumed ``skip_batches`` batches.

        The DataLoader takes batches from its workers in turn, so worker w made batches w, w+n, w+2n, ...
        """
        return len(range(worker, self.skip_batches, num_workers)) * self.batch_size

    def epoch_shards(self, epoch: int, consumers: int) -> tuple[list[str], bool]:
        """The shard order of ``epoch``, and whether consumers share every shard (fewer shards than consumers:
        each keeps every n-th sample) instead of taking every n-th shard."""
        order = list(self.urls)
        if self.infinite:
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order, len(order) < consumers

    def epoch_counts(self, epoch: int, consumer: int, consumers: int) -> list[tuple[str, int]] | None:
        """``(url, how many of its samples go to consumer)`` for the shards the consumer reads in ``epoch``,
        from the index entries (None when a url has none: then a resume has to read to skip)."""
        order, shared = self.epoch_shards(epoch, consumers)
        if any(u not in self.expect for u in order):
            return None
        if not shared:
            return [(u, self.expect[u]["samples"]) for u in order[consumer::consumers]]
        out, start = [], 0
        for u in order:
            end = start + self.expect[u]["samples"]
            out.append((u, len(range(consumer, end, consumers)) - len(range(consumer, start, consumers))))
            start = end
        return out

    def epoch_stream(self, epoch: int, consumer: int, consumers: int,
                     needed: Callable[[int], bool] | None = None) -> Iterator[dict]:
        """Undecoded samples of ``epoch`` for consumer ``consumer`` of ``consumers``. With ``needed`` (does the
        consumer still need its sample at this position of the epoch?) every other sample is the placeholder
        ``SKIPPED``, and a shard holding none that is needed is not opened at all."""
        order, shared = self.epoch_shards(epoch, consumers)
        if needed is None:
            plan = [(u, True) for u in (order if shared else order[consumer::consumers])]
        else:
            plan, pos = [], 0
            for url, n in self.epoch_counts(epoch, consumer, consumers):
                plan.append((url, any(needed(i) for i in range(pos, pos + n))))
                pos += n
        reading = verified_in_turn([u for u, read in plan if read], self.expect)
        pos = i = 0  # the consumer's position in the epoch; the sample's index among every consumer's
        for url, read in plan:
            if not read:
                mine = len(range(consumer, i + self.expect[url]["samples"], consumers)) - len(
                    range(consumer, i, consumers)) if shared else self.expect[url]["samples"]
                yield from itertools.repeat(SKIPPED, mine)
                pos, i = pos + mine, i + self.expect[url]["samples"]
                continue
            next(reading)  # hashed by now, or hashing raises
            for sample in read_tar(url, self.expect.get(url)):
                i += 1
                if shared and (i - 1) % consumers != consumer:
                    continue
                yield sample if needed is None or needed(pos) else SKIPPED
                pos += 1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        consumer, consumers = self.rank * nworkers + wid, self.world_size * nworkers
        skip = self.samples_to_skip(wid, nworkers)  # resuming: fast-forward without decoding
        for sample in self.raw_samples(consumer, consumers, skip):
            yield decode(sample)

    def epoch_rng(self, epoch: int, consumer: int) -> random.Random:
        return random.Random(f"{self.seed}-{epoch}-{consumer}")

    def raw_samples(self, consumer: int, consumers: int, skip: int = 0) -> Iterator[dict]:
        """Undecoded samples from the ``skip``-th on. A resume skips whole epochs without reading, then whole
        shards, and reads only the shards holding a sample still to come (or still in the shuffle buffer):
        the index's sample counts say where each epoch and shard begins."""
        epoch = 0
        while True:
            counts = self.epoch_counts(epoch, consumer, consumers) if skip else None
            needed = None
            if counts is not None:
                n = sum(c for _, c in counts)
                if skip >= n:
                    skip -= n
                    if not self.infinite:
                        return
                    epoch += 1
                    continue
                needed = self.still_needed(n, skip, epoch, consumer)
            stream = self.epoch_stream(epoch, consumer, consumers, needed)
            if self.shuffle_buffer > 1:
                stream = shuffled(stream, self.shuffle_buffer, self.epoch_rng(epoch, consumer))
            for sample in stream:
                if skip:  # with ``needed`` these are placeholders; without, samples read only to be dropped
                    skip -= 1
                    continue
                assert sample is not SKIPPED, "a resume skipped a sample it still needed"
                yield sample
            if not self.infinite:
                return
            epoch += 1

    def still_needed(self, n: int, skip: int, epoch: int, consumer: int) -> Callable[[int], bool]:
        """Which positions (in an epoch of ``n``) come out after the first ``skip``: those still in the shuffle
        buffer then, and those not read yet. The shuffle depends only on counts and its seed, so it is
        replayed on positions, not on data."""
        if self.shuffle_buffer <= 1:
            return range(skip, n).__contains__
        positions, buf = iter(range(n)), []
        for _ in itertools.islice(shuffled(positions, self.shuffle_buffer, self.epoch_rng(epoch, consumer), buf),
                                  skip):
            pass
        held, unread = frozenset(buf), n - operator.length_hint(positions)
        return lambda i: i >= unread or i in held


SKIPPED: dict = {}  # stands in for a sample a resume has already trained on (never decoded, never yielded)


def shuffled(stream: Iterator[dict], size: int, rng: random.Random, buf: list | None = None) -> Iterator[dict]:
    """Bounded-buffer shuffle: memory stays at ``size`` samples whatever the dataset. ``buf`` (an empty list)
    lets a caller look into the buffer."""
    buf = [] if buf is None else buf
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def shard_entries(shards_dir: str, split: str) -> dict[str, dict]:
    """``{url: index entry}`` of ``split``'s shards, in index order (a local folder or any fsspec URL)."""
    index = load_index(shards_dir)
    if split not in index["splits"]:
        raise DitpipeError(f"split {split!r} not in {shards_dir}/index.json (have: {', '.join(index['splits'])})")
    return {f"{str(shards_dir).rstrip('/')}/{s['name']}": s for s in index["splits"][split]["shards"]}


def shard_urls(shards_dir: str, split: str) -> list[str]:
    """Shard URLs of ``split`` from ``index.json``."""
    return list(shard_entries(shards_dir, split))


def load_index(shards_dir: str | Path) -> dict:
    path = f"{str(shards_dir).rstrip('/')}/index.json"
    try:
        with fsspec.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DitpipeError(f"{path} not found: run `ditpipe shards` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DitpipeError(f"{path} is damaged ({exc}): {REBUILD}") from None


def empty_caption(shards_dir: str | Path) -> dict[str, torch.Tensor]:
    """The empty caption's embedding (for classifier-free guidance dropout)."""
    index = load_index(shards_dir)
    with fsspec.open(f"{str(shards_dir).rstrip('/')}/{index['empty_caption']}", "rb") as f:
        return load_safetensors(f.read())


def make_loader(shards_dir: str | Path, split: str, batch_size: int, *, num_workers: int = 0,
                shuffle_buffer: int | None = None, seed: int = 0, rank: int | None = None,
                world_size: int | None = None, infinite: bool | None = None, skip_batches: int = 0) -> DataLoader:
    """A DataLoader of collated batches. Train defaults: infinite + shuffled; val: one ordered pass."""
    train = split == "train"
    if rank is None or world_size is None:
        rank, world_size = dist_info()
    entries = shard_entries(str(shards_dir), split)
    stream = ShardStream(
        list(entries), expect=entries, rank=rank, world_size=world_size, seed=seed,
        shuffle_buffer=(1000 if train else 0) if shuffle_buffer is None else shuffle_buffer,
        infinite=train if infinite is None else infinite, skip_batches=skip_batches, batch_size=batch_size,
    )
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      drop_last=train, persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
