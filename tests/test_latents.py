import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ditpipe.cache import TensorCache, latent_key
from ditpipe.config import DataConfig, LatentsConfig, VaeConfig
from ditpipe.io import TMP_PREFIX, read_json, read_jsonl
from ditpipe.latents import encode_batch, run
from ditpipe.prepare import run as prepare
from ditpipe.vae import build_vae
from ditpipe.vae import run as make_vae
from tests.conftest import REPO

TINY = VaeConfig(block_out_channels=(8, 16), latent_channels=4, steps=2, batch_size=8)


@pytest.fixture
def upstream(tmp_path):
    prepare(DataConfig(count=40, resolution=16), tmp_path / "prepared")
    make_vae(TINY, tmp_path / "prepared", tmp_path / "vae")
    return tmp_path


def test_encode_batch_shapes_and_flip():
    vae = build_vae(VaeConfig(block_out_channels=(8, 16), latent_channels=4), 16).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = encode_batch(vae, x, flip=True)
    assert set(out) == {"mean", "logvar", "mean_flip", "logvar_flip"}
    assert out["mean"].shape == (3, 4, 8, 8)
    direct = vae.encode(x.flip(-1)).latent_dist.mean
    torch.testing.assert_close(out["mean_flip"], direct)


def test_a_cache_entry_is_the_same_bytes_from_any_process(tmp_path):
    """safetensors orders metadata by a per-process hash seed; the cache sorts it, so a Dask worker's entry
    equals this process's byte for byte (and still reads back, digest checked)."""
    code = ("import sys, torch; from ditpipe.cache import TensorCache; TensorCache(sys.argv[1]).put('ab12', "
            "{'mean': torch.arange(6.).view(2, 3), 'logvar': torch.ones(2)}, {'vae': 'v', 'resolution': '16', "
            "'sample': 'k', 'z': '1'})")
    files = []
    for i in range(3):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / str(i))], check=True, cwd=REPO)
        files.append((tmp_path / str(i) / "ab" / "ab12.safetensors").read_bytes())
    assert files[0] == files[1] == files[2]
    header = json.loads(files[0][8 : 8 + int.from_bytes(files[0][:8], "little")])
    assert list(header["__metadata__"]) == ["ditpipe.sha256", "resolution", "sample", "vae", "z"]
    assert torch.equal(TensorCache(tmp_path / "0").get("ab12")["mean"], torch.arange(6.).view(2, 3))


def test_rerun_encodes_nothing_and_new_vae_reencodes_all(upstream):
    p = upstream
    cfg = LatentsConfig(batch_size=16)
    first = run(cfg, p / "prepared", p / "vae", p / "latents")
    assert first["encoded"] == 40 and first["cached"] == 0
    again = run(cfg, p / "prepared", p / "vae", p / "latents")
    assert again["encoded"] == 0 and again["cached"] == 40
    index = read_json(p / "latents" / "index.json")
    assert index["samples"] == 40 and index["latent_shape"] == [4, 8, 8]
    assert not list((p / "latents").rglob(f"{TMP_PREFIX}*"))  # the on-disk sets are gone with the run
    other = VaeConfig(block_out_channels=(8, 16), latent_channels=4, steps=2, batch_size=8, seed=1)
    make_vae(other, p / "prepared", p / "vae")
    new = run(cfg, p / "prepared", p / "vae", p / "latents")
    assert new["encoded"] == 40 and new["pruned"] == 40
    assert read_json(p / "latents" / "index.json")["vae_identity"] != index["vae_identity"]
    flipped = run(LatentsConfig(batch_size=16, flip=True, storage_dtype="float16"), p / "prepared", p / "vae",
                  p / "latents")
    assert flipped["encoded"] == 40
    entry = TensorCache(p / "latents" / "cache").get(entry_key(p, "shapes-0000000"))
    assert entry["mean_flip"].dtype == torch.float16


def entry_key(p, sample: str) -> str:
    """A sample's latents entry, found as shards finds it: from its row and the index's fields."""
    index = read_json(p / "latents" / "index.json")
    row = next(r for r in read_jsonl(p / "prepared" / "samples.jsonl") if r["key"] == sample)
    return latent_key(row["sha256"], index["vae_identity"], index["resolution"], index["dtype"],
                      index["storage_dtype"], index["flip"])


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path):
    """A latents run killed with SIGKILL leaves only whole entries; the re-run finishes the rest."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "data": {"count": 1500, "resolution": 16},
        "vae": {"block_out_channels": [8, 16], "latent_channels": 4, "steps": 1, "batch_size": 4},
        "latents": {"batch_size": 1},
    }))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}

    def ditpipe(*args):
        return subprocess.run([sys.executable, "-m", "ditpipe", *args, "--params", str(params)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, check=True)

    ditpipe("prepare")
    ditpipe("vae")
    cache = TensorCache(tmp_path / "artifacts" / "latents" / "cache")
    proc = subprocess.Popen([sys.executable, "-m", "ditpipe", "latents", "--params", str(params)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(cache.keys()) < 100 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(cache.keys())
    assert 100 <= done_before < 1500, f"kill landed at {done_before} of 1500"
    assert not (tmp_path / "artifacts" / "latents" / "index.json").exists()
    for key in cache.keys():  # every visible entry is whole
        assert cache.get(key)["mean"].shape == (4, 8, 8)
    out = ditpipe("latents").stdout
    assert f"encoded {1500 - done_before}, reused {done_before} cached, 1500 total" in out
    assert not list(cache.root.rglob(f"{TMP_PREFIX}*"))
    resumed = {k: cache.get(k)["mean"] for k in cache.keys()}
    fresh = tmp_path / "fresh"
    run(LatentsConfig(batch_size=64), tmp_path / "artifacts" / "prepared", tmp_path / "artifacts" / "vae", fresh)
    fresh_cache = TensorCache(fresh / "cache")
    assert fresh_cache.keys() == set(resumed)
    for k, v in resumed.items():
        torch.testing.assert_close(fresh_cache.get(k)["mean"], v, atol=1e-5, rtol=1e-4)


def test_damaged_cache_entries_are_re_encoded_and_named_by_readers(upstream):
    from ditpipe.errors import DitpipeError

    p = upstream
    cfg = LatentsConfig(batch_size=16)
    run(cfg, p / "prepared", p / "vae", p / "latents")
    cache = TensorCache(p / "latents" / "cache", "latents")
    key = entry_key(p, "shapes-0000003")
    good = cache.get(key)
    data = bytearray(cache.path(key).read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data: safetensors still loads it, only the digest sees it
    cache.path(key).write_bytes(bytes(data))
    with pytest.raises(DitpipeError, match=f"cache entry .*{key}.* damaged.*run `ditpipe latents`"):
        cache.get(key)
    again = run(cfg, p / "prepared", p / "vae", p / "latents")
    assert again["encoded"] == 1 and again["cached"] == 39
    torch.testing.assert_close(cache.get(key), good, atol=1e-3, rtol=1e-3)  # encoded alone, not in a batch of 16
    cache.path(key).write_bytes(cache.path(key).read_bytes()[:40])  # cut: the header no longer parses
    assert not cache.valid(key)
    assert run(cfg, p / "prepared", p / "vae", p / "latents")["encoded"] == 1


def test_empty_input_leaves_the_cache_alone(upstream):
    from ditpipe.errors import DitpipeError

    p = upstream
    run(LatentsConfig(batch_size=16), p / "prepared", p / "vae", p / "latents")
    before = sorted((p / "latents" / "cache").rglob("*.safetensors"))
    (p / "prepared" / "samples.jsonl").write_text("")
    with pytest.raises(DitpipeError, match="holds no samples"):
        run(LatentsConfig(batch_size=16), p / "prepared", p / "vae", p / "latents")
    assert sorted((p / "latents" / "cache").rglob("*.safetensors")) == before and len(before) == 40


def test_a_second_writer_of_one_cache_is_refused_at_once(upstream):
    from ditpipe.errors import DitpipeError
    from ditpipe.io import exclusive

    p = upstream
    holder = subprocess.Popen([sys.executable, "-c", "import time; from ditpipe.io import exclusive\n"
                               f"with exclusive({str(p / 'latents')!r}):\n print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DitpipeError, match=f"{p / 'latents'} is in use by pid {holder.pid}"):
            run(LatentsConfig(batch_size=16), p / "prepared", p / "vae", p / "latents")
        assert not (p / "latents" / "cache").exists()  # refused before touching anything
    finally:
        holder.kill()
        holder.wait()
    with exclusive(p / "latents"):  # a dead holder's lock is free
        pass


@pytest.mark.parametrize("damage, why", [
    (lambda p: __import__("PIL.Image").Image.new("RGB", (16, 16), "red").save(p), "pixels differ from the sha256"),
    (lambda p: p.write_bytes(p.read_bytes()[:60]), "damaged"),
    (lambda p: p.unlink(), "is missing"),
])
def test_a_damaged_prepared_image_is_named_not_encoded(upstream, damage, why):
    from ditpipe.errors import DitpipeError
    from ditpipe.io import read_jsonl

    p = upstream
    row = next(read_jsonl(p / "prepared" / "samples.jsonl"))
    damage(p / "prepared" / row["file"])
    with pytest.raises(DitpipeError, match=f"prepared image .*{row['file']}.*{why}.*re-run `ditpipe prepare`"):
        run(LatentsConfig(batch_size=16), p / "prepared", p / "vae", p / "latents")
