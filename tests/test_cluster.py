"""The per-sample data stages on a real local Dask cluster of two worker processes."""

import os
import signal
import sys
from pathlib import Path

import pytest

from ditpipe.cluster import part_of, worker_path
from ditpipe.config import ClusterConfig, DataConfig, LatentsConfig, ShardsConfig, TextConfig

pytestmark = pytest.mark.slow

DASK = ClusterConfig(engine="dask", workers=2, parts=4)


def assert_same_files(a: Path, b: Path) -> int:
    """Every file under ``a`` and ``b`` (index, cache entries, shards) the same, byte for byte; returns how many."""
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    different = [str(n) for n in names if (a / n).read_bytes() != (b / n).read_bytes()]
    assert not different, different[:5]
    return len(names)


def test_parts_by_key_hash_do_not_move_when_the_dataset_grows():
    keys = [f"sample-{i}" for i in range(1000)]
    before = {k: part_of(k, 16) for k in keys[:500]}
    assert {k: part_of(k, 16) for k in keys if k in before} == before
    assert len(set(before.values())) == 16  # and spread over every part


class KilledMidPart:
    """Stands in for a stage's part function: the first time it runs part 0, its worker process is killed
    (SIGKILL) right after the third call of ``writer`` (``module:attribute``, what writes one sample's output);
    every other call is the real part."""

    def __init__(self, real, marker: str, part_arg: int, writer: str):
        self.real, self.marker, self.part_arg, self.writer = real, marker, part_arg, writer

    def __call__(self, *args):
        import importlib

        if args[self.part_arg] == 0 and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            module, attribute = self.writer.split(":")
            *path, name = attribute.split(".")
            owner = importlib.import_module(module)
            for step in path:
                owner = getattr(owner, step)
            write, written = getattr(owner, name), []

            def write_then_die(*a, **k):
                out = write(*a, **k)
                written.append(1)
                if len(written) == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                return out

            setattr(owner, name, write_then_die)
        return self.real(*args)


def test_latents_text_and_shards_from_a_dask_cluster_match_in_process_even_after_a_killed_worker(
        tiny_shards, tiny_text_encoder, tmp_path, monkeypatch):
    import cloudpickle

    from ditpipe import latents, text
    from ditpipe.shards import run as shards

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    p = tiny_shards
    lat_cfg, txt_cfg = LatentsConfig(flip=True), TextConfig(encoder=str(tiny_text_encoder), max_length=8)
    marker = tmp_path / "killed"
    monkeypatch.setattr(latents, "encode_part",
                        KilledMidPart(latents.encode_part, str(marker), 4, "ditpipe.cache:TensorCache.put"))
    on_dask = latents.run(lat_cfg, p / "prepared", p / "vae", tmp_path / "latents", DASK)
    assert marker.exists()  # a worker did die in the middle of part 0
    # the three entries written before the kill were kept by the retry, nothing was encoded twice
    assert on_dask["total"] == 60 and on_dask["encoded"] == 57 and on_dask["engine"] == "dask"
    assert assert_same_files(tmp_path / "latents", p / "latents") == 61  # the in-process run's files: index + 60
    assert text.run(txt_cfg, p / "prepared", tmp_path / "text", DASK)["encoded"] > 0
    assert_same_files(tmp_path / "text", p / "text")
    shards(ShardsConfig(max_samples=7), p / "prepared", tmp_path / "latents", tmp_path / "text", tmp_path / "shards")
    assert_same_files(tmp_path / "shards", p / "shards")  # index.json and every tar
    again = latents.run(lat_cfg, p / "prepared", p / "vae", tmp_path / "latents", DASK)
    assert again["encoded"] == 0 and again["cached"] == 60  # every part finds its entries


def test_prepare_on_a_dask_cluster_writes_what_one_process_writes_even_after_a_killed_worker(
        tiny_shards, tmp_path, monkeypatch):
    import cloudpickle

    from ditpipe import prepare

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "killed"
    monkeypatch.setattr(prepare, "prepare_part",
                        KilledMidPart(prepare.prepare_part, str(marker), 2, "ditpipe.prepare:png_bytes"))
    summary = prepare.run(DataConfig(count=60, resolution=16, val_fraction=0.2), tmp_path / "prepared", DASK)
    assert marker.exists() and summary["engine"] == "dask"  # a worker died after three images of part 0
    assert summary["accepted"] == 60
    assert assert_same_files(tmp_path / "prepared", tiny_shards / "prepared") == 63  # the fixture's, made in-process


def test_an_unreachable_scheduler_is_one_line_naming_it(tiny_shards, tmp_path):
    from ditpipe.errors import DitpipeError
    from ditpipe.text import run
    from tests.conftest import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(DitpipeError, match=f"cluster.address {address} does not answer"):
        run(TextConfig(), tiny_shards / "prepared", tmp_path / "text", ClusterConfig(engine="dask", address=address))


def test_worker_paths_are_absolute_and_urls_pass_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert worker_path("artifacts/prepared") == str(tmp_path / "artifacts/prepared")
    assert worker_path(Path("data") / "{000..009}.tar") == str(tmp_path / "data/{000..009}.tar")
    for unchanged in ("s3://bucket/x-{0..1}.tar", "file:///data/x.tar", "builtin:shapes", "/abs/x"):
        assert worker_path(unchanged) == unchanged
