import io
import itertools
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditpipe.config import ShardsConfig
from ditpipe.errors import DitpipeError
from ditpipe.io import read_json, sha256_file
from ditpipe.loader import ShardStream, decode, make_loader, read_tar
from ditpipe.shards import AtomicShardWriter, pack, run, write_order


def fake_rows(n, val_every=5):
    return [{"key": f"s{i:05d}", "caption": f"cap {i % 7}", "split": "val" if i % val_every == 0 else "train"}
            for i in range(n)]


def fake_latents(row):
    i = int(row["key"][1:])
    return {"mean": torch.full((2, 2, 2), float(i)), "logvar": torch.zeros(2, 2, 2)}


def fake_text(caption):
    return {"emb": torch.ones(3, 4), "mask": torch.ones(3, dtype=torch.uint8), "pooled": torch.ones(4)}


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 120), max_samples=st.integers(1, 40), max_bytes=st.integers(1024, 20000),
       seed=st.integers(0, 5))
def test_shards_lose_and_duplicate_nothing(tmp_path_factory, n, max_samples, max_bytes, seed):
    out = tmp_path_factory.mktemp("shards")
    rows = fake_rows(n)
    seen: Counter = Counter()
    for split in ("train", "val"):
        writer = AtomicShardWriter(out, split, max_samples, max_bytes)
        list(pack(write_order(rows, split, seed), writer, fake_latents, fake_text))
        for shard in writer.close():
            path = out / shard["name"]
            assert shard["samples"] <= max_samples
            assert shard["samples"] == 1 or shard["bytes"] <= max_bytes
            assert shard["sha256"] == sha256_file(path)
            samples = [decode(s) for s in read_tar(str(path))]
            assert len(samples) == shard["samples"]
            for s in samples:
                assert s["info"]["key"] == s["__key__"]
                assert float(s["mean"].flat[0]) == int(s["__key__"][1:])  # latents joined to the right key
                seen[(split, s["__key__"])] += 1
    assert sorted(k for _, k in seen) == sorted(r["key"] for r in rows)  # nothing lost
    assert all(c == 1 for c in seen.values())  # nothing duplicated
    assert {(r["split"], r["key"]) for r in rows} == set(seen)  # each in its own split
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_val_order_is_sorted_train_is_shuffled():
    rows = fake_rows(50)
    assert [r["key"] for r in write_order(rows, "val", 0)] == sorted(r["key"] for r in rows if r["split"] == "val")
    train = [r["key"] for r in write_order(rows, "train", 0)]
    assert train != sorted(train) and train == [r["key"] for r in write_order(rows, "train", 0)]


@settings(max_examples=20, deadline=None)
@given(keys=st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6),
                     unique=True, max_size=60), seed=st.integers(0, 3))
def test_the_on_disk_order_is_write_order(tmp_path_factory, keys, seed):
    """The stage orders rows by SQLite on disk, 8 bytes a sample in memory, in the same order as write_order
    (non-ASCII keys included): the shards do not change with the dataset's size."""
    from ditpipe.shards import ordered_offsets, read_row

    work = tmp_path_factory.mktemp("order")
    rows = [{"key": k, "split": ("val", "train")[len(k) % 2]} for k in keys]
    (work / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    order = ordered_offsets(work / "samples.jsonl", seed, work)
    with open(work / "samples.jsonl", "rb") as f:
        for split in ("train", "val"):
            got = [read_row(f, o)["key"] for o in order[split]]
            assert got == [r["key"] for r in write_order(rows, split, seed)]
    assert [p.name for p in work.iterdir()] == ["samples.jsonl"]  # the scratch database is gone


@pytest.fixture
def built(tiny_shards):
    return tiny_shards


def test_run_writes_index_matching_prepared(built):
    index = read_json(built / "shards" / "index.json")
    prepared = read_json(built / "prepared" / "meta.json")
    for split in ("train", "val"):
        assert index["splits"][split]["samples"] == prepared["splits"][split]
        assert all(s["samples"] <= 7 for s in index["splits"][split]["shards"])
    assert index["latents"]["scaling_factor"] > 0 and index["latents"]["latent_shape"] == [4, 8, 8]
    assert index["text"]["dim"] == 32 and index["text"]["max_length"] == 8
    assert (built / "shards" / "empty_caption.safetensors").exists()


def test_loader_batches_and_val_pass(built):
    batch = next(iter(make_loader(built / "shards", "train", 8)))
    assert batch["mean"].shape == (8, 4, 8, 8) and batch["mean_flip"].shape == (8, 4, 8, 8)
    assert batch["emb"].shape == (8, 8, 32) and batch["mask"].dtype == torch.uint8
    assert len(batch["caption"]) == 8
    val = [k for b in make_loader(built / "shards", "val", 5) for k in b["key"]]
    index = read_json(built / "shards" / "index.json")
    assert len(val) == index["splits"]["val"]["samples"] == len(set(val))
    assert val == [k for b in make_loader(built / "shards", "val", 5) for k in b["key"]]  # deterministic


def _epoch_keys(built, rank, world, workers, epoch=0):
    shards = read_json(built / "shards" / "index.json")["splits"]["train"]["shards"]
    urls = [str(built / "shards" / s["name"]) for s in shards]
    stream = ShardStream(urls, rank=rank, world_size=world, infinite=True, seed=3)
    return [[s["__key__"] for s in stream.epoch_stream(epoch, rank * workers + w, world * workers)]
            for w in range(workers)]


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 1), (2, 2), (3, 4)])
def test_ranks_and_workers_split_an_epoch_exactly(built, world, workers):
    total = read_json(built / "shards" / "index.json")["splits"]["train"]["samples"]
    parts = [keys for r in range(world) for keys in _epoch_keys(built, r, world, workers)]
    flat = [k for p in parts for k in p]
    assert len(flat) == total and len(set(flat)) == total  # disjoint and complete, even with few shards
    assert all(parts)  # nobody idles


def test_infinite_stream_reshuffles_each_epoch(built):
    assert _epoch_keys(built, 0, 1, 1, 0) != _epoch_keys(built, 0, 1, 1, 1)


@pytest.mark.parametrize("consumers", [1, 3, 9])  # 9 consumers > 7 shards: every consumer reads every shard
@pytest.mark.parametrize("buffer", [0, 10])
def test_a_resume_skips_epochs_and_shards_unread_and_continues_the_same_stream(built, monkeypatch, consumers,
                                                                               buffer):
    from ditpipe import loader
    from ditpipe.loader import shard_entries

    entries = shard_entries(str(built / "shards"), "train")
    stream = ShardStream(list(entries), expect=entries, infinite=True, seed=3, shuffle_buffer=buffer)
    opened = []
    real_read_tar = loader.read_tar
    monkeypatch.setattr(loader, "read_tar", lambda url, expect=None: opened.append(url) or real_read_tar(url, expect))
    consumer = consumers - 1
    sizes = [sum(n for _, n in stream.epoch_counts(e, consumer, consumers)) for e in range(3)]  # epochs differ
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    straight = [s["__key__"] for s in itertools.islice(stream.raw_samples(consumer, consumers), sum(sizes))]
    for epoch, into in ((0, 1), (0, sizes[0] - 1), (1, 0), (2, sizes[2] // 2)):
        skip = starts[epoch] + into
        resumed = [s["__key__"] for s in itertools.islice(stream.raw_samples(consumer, consumers, skip),
                                                          sum(sizes) - skip)]
        assert resumed == straight[skip:]  # exactly the samples the uninterrupted stream gives next
        opened.clear()  # what the rest of the epoch it resumes in reads:
        list(itertools.islice(stream.raw_samples(consumer, consumers, skip), sizes[epoch] - into))
        order, shared = stream.epoch_shards(epoch, consumers)
        mine = order if shared else order[consumer::consumers]
        assert set(opened) <= set(mine)  # nothing of the epochs it skipped
        if buffer == 0 and not shared:  # and no shard whose samples all came before the resume point
            done = list(itertools.accumulate(entries[u]["samples"] for u in mine))
            assert len(opened) == len(mine) - sum(d <= into for d in done)


def test_no_pickle_in_shards(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        data = buf.getvalue()
        info = tarfile.TarInfo("k1.mean.npy")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="allow_pickle"):
        [decode(s) for s in read_tar(str(tmp_path / "bad.tar"))]


def test_stale_upstream_is_named(built, tmp_path):
    import shutil

    shutil.copytree(built / "latents", tmp_path / "latents")
    victim = sorted((tmp_path / "latents" / "cache").glob("*/*.safetensors"))[0]
    victim.unlink()  # the entry of a sample prepared after the latents ran
    with pytest.raises(DitpipeError, match="the latents are stale, run `ditpipe latents`"):
        run(ShardsConfig(), built / "prepared", tmp_path / "latents", built / "text", tmp_path / "shards")


def test_shards_are_byte_identical_across_runs(built, tmp_path):
    again = run(ShardsConfig(max_samples=7), built / "prepared", built / "latents", built / "text", tmp_path / "s")
    assert again["splits"]["train"]["samples"] > 0
    first = read_json(built / "shards" / "index.json")["splits"]
    second = read_json(tmp_path / "s" / "index.json")["splits"]
    assert first == second  # same names, counts, bytes and sha256: DVC sees no change


@pytest.mark.parametrize("arr", [np.arange(12, dtype=np.float16).reshape(3, 4), np.asfortranarray(np.ones((3, 5))),
                                 np.zeros((0, 3), dtype=np.float32), np.array(3.5), np.eye(2, dtype=np.uint8)])
def test_load_npy_matches_numpy(arr):
    from ditpipe.loader import load_npy

    buf = io.BytesIO()
    np.save(buf, arr)
    out = load_npy(buf.getvalue())
    assert out.dtype == arr.dtype and out.shape == arr.shape and np.array_equal(out, arr)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(2, 0))
    assert np.array_equal(load_npy(buf.getvalue()), arr)


def _damaged_copy(built, tmp_path, damage):
    """A copy of the shards with the first train shard damaged by ``damage(path, data)``."""
    import shutil

    shutil.copytree(built / "shards", tmp_path / "shards")
    first = read_json(tmp_path / "shards" / "index.json")["splits"]["train"]["shards"][0]
    path = tmp_path / "shards" / first["name"]
    damage(path, path.read_bytes())
    return tmp_path / "shards", first["name"]


def _cut_at_member(path, data):
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    path.write_bytes(data[: members[len(members) // 2].offset])  # a whole prefix of the members: parses cleanly


def _flip_bytes(path, data):
    b = bytearray(data)
    b[1600:1604] = b"\xff\xff\xff\x7f"  # inside the first member's data: the tar still parses
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("damage, why", [
    (_cut_at_member, "bytes, index.json says"),
    (lambda p, d: p.write_bytes(d[: len(d) // 2 + 100]), "bytes, index.json says"),  # cut mid-member
    (_flip_bytes, "sha256 differs"),
    (lambda p, d: p.unlink(), "is missing"),
])
def test_damaged_shard_is_named_and_never_read(built, tmp_path, damage, why):
    shards, name = _damaged_copy(built, tmp_path, damage)
    loader = make_loader(shards, "train", 4, shuffle_buffer=0, infinite=False)
    with pytest.raises(DitpipeError, match=f"shard .*{name} .*{why}.*re-run `ditpipe shards`"):
        for _ in loader:
            pass


def test_shard_with_wrong_count_is_refused(built, tmp_path):
    """A shard whose bytes match but whose index entry says another count (an edited or mixed index)."""
    import json

    shards, name = _damaged_copy(built, tmp_path, lambda p, d: None)
    index = read_json(shards / "index.json")
    index["splits"]["train"]["shards"][0]["samples"] += 1
    (shards / "index.json").write_text(json.dumps(index))
    with pytest.raises(DitpipeError, match=f"{name} holds .* samples, index.json says"):
        list(make_loader(shards, "train", 4, shuffle_buffer=0, infinite=False))


def test_memory_mapped_and_streamed_shards_read_the_same(built):
    """Local shards are memory-mapped (zero-copy members); other fsspec URLs stream through webdataset's reader."""
    import fsspec

    from ditpipe.loader import shard_entries

    url, entry = next(iter(shard_entries(str(built / "shards"), "train").items()))
    with fsspec.open(f"memory://shards/{entry['name']}", "wb") as f:
        f.write(open(url, "rb").read())
    mapped = [decode(s) for s in read_tar(url, entry)]
    streamed = [decode(s) for s in read_tar(f"memory://shards/{entry['name']}", entry)]
    assert len(mapped) == len(streamed) == entry["samples"]
    for a, b in zip(mapped, streamed):
        assert a.keys() == b.keys() and a["info"] == b["info"]
        assert all(np.array_equal(a[k], b[k]) for k in a if k not in ("__key__", "info"))


def test_a_shard_cut_inside_a_member_is_named_even_without_its_index_entry(built, tmp_path):
    shards, name = _damaged_copy(built, tmp_path, lambda p, data: p.write_bytes(data[: len(data) // 2 + 700]))
    with pytest.raises(DitpipeError, match=f"shard .*{name} is (cut short inside|damaged)"):
        list(read_tar(str(shards / name)))


def test_plain_headers_are_read_as_tarfile_reads_them_and_anything_else_goes_to_tarfile(built, tmp_path):
    from ditpipe.loader import mapped_members, plain_members, shard_entries

    url = next(iter(shard_entries(str(built / "shards"), "train")))
    data = open(url, "rb").read()
    with tarfile.open(url) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isreg()]
    assert plain_members(memoryview(data)) == expected  # what `shards` writes takes the fast path

    long_name = tmp_path / "long.tar"  # a name past ustar's 100 bytes needs a PAX header
    with tarfile.open(long_name, "w") as tar:
        for name, payload in ((f"{'k' * 120}.mean.npy", b"abc"), ("short.txt", b"hello")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert plain_members(memoryview(long_name.read_bytes())) is None
    assert [(m["fname"], bytes(m["data"])) for m in mapped_members(str(long_name))] == [
        (f"{'k' * 120}.mean.npy", b"abc"), ("short.txt", b"hello")]

    bad = bytearray(data)
    bad[10] ^= 0xFF  # inside the first header's name: its checksum no longer adds up
    assert plain_members(memoryview(bytes(bad))) is None
    assert plain_members(memoryview(data[: len(data) // 2])) is None  # cut: no end block
    bad_path = tmp_path / "bad.tar"
    bad_path.write_bytes(bytes(bad))
    with pytest.raises(DitpipeError, match="bad.tar is damaged"):
        list(read_tar(str(bad_path)))
