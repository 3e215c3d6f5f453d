"""Object storage: datasets read from, and shards written to and trained from, an S3 endpoint (a local moto
server on 127.0.0.1, addressed exactly as real S3 is: ``s3://`` URLs, endpoint and keys from the environment)."""

import io
import json
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ditpipe.config import DataConfig, ShardsConfig, load_config, to_dict
from ditpipe.data.shapes import generate
from ditpipe.io import read_json, read_jsonl, sha256_file

pytestmark = pytest.mark.slow


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _put(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb") as f:
        f.write(data)


def _dataset(tmp_path, s3_bucket):
    """The same 24 shapes as two webdataset tars and as one parquet file, on local disk and on S3."""
    scenes = list(generate(seed=5, count=24, resolution=24))
    local = tmp_path / "data"
    local.mkdir()
    for part in range(2):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for key, img, caption, _ in scenes[part * 12 : (part + 1) * 12]:
                for ext, data in (("png", _png(img)), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (local / f"part-{part}.tar").write_bytes(buf.getvalue())
        _put(f"{s3_bucket}/data/part-{part}.tar", buf.getvalue())
    table = pa.table({"image": [{"bytes": _png(img), "path": None} for _, img, _, _ in scenes],
                      "text": [caption for _, _, caption, _ in scenes]})
    pq.write_table(table, local / "train.parquet")
    _put(f"{s3_bucket}/data/train.parquet", (local / "train.parquet").read_bytes())
    return local


def _rows(folder):
    return [(r["key"], r["caption"], r["sha256"], r["split"]) for r in read_jsonl(folder / "samples.jsonl")]


def test_prepare_reads_webdataset_tars_and_parquet_from_s3_as_from_disk(tmp_path, s3_bucket):
    from ditpipe.prepare import run

    local = _dataset(tmp_path, s3_bucket)
    for pattern in ("part-{0..1}.tar", "train.parquet"):
        on_s3 = run(DataConfig(source=f"{s3_bucket}/data/{pattern}", resolution=16, val_fraction=0.25),
                    tmp_path / "from-s3")
        on_disk = run(DataConfig(source=f"{local}/{pattern}", resolution=16, val_fraction=0.25), tmp_path / "from-disk")
        assert on_s3["accepted"] == on_disk["accepted"] == 24
        assert _rows(tmp_path / "from-s3") == _rows(tmp_path / "from-disk")


def test_shards_written_to_s3_are_the_local_shards_and_train_reads_them(tiny_shards, tmp_path, s3_bucket):
    from ditpipe.shards import run as shards
    from ditpipe.train import run as train

    url = f"{s3_bucket}/shards"
    p = tiny_shards
    shards(ShardsConfig(max_samples=7), p / "prepared", p / "latents", p / "text", url)
    fs = fsspec.filesystem("s3")
    local_index = read_json(p / "shards" / "index.json")
    with fsspec.open(f"{url}/index.json") as f:
        assert json.load(f) == local_index  # same shards, byte for byte (names, sizes, sha256)
    listed = {name.rsplit("/", 1)[1] for name in fs.ls(url.removeprefix("s3://"), detail=False)}
    assert listed == {s["name"] for sp in local_index["splits"].values() for s in sp["shards"]} | {
        "index.json", "empty_caption.safetensors"}
    assert not list(tiny_shards.glob(".tmp-shards-upload-*"))  # the local build folder is gone

    cfg = load_config(None, ["model.arch=dit", "model.size=T/2", "train.steps=3", "train.batch_size=4",
                             "train.eval_every=0", "tracking.enabled=false", f"paths.shards={url}"])
    summary = train(cfg.model, cfg.train, cfg.tracking, url, tmp_path / "run", to_dict(cfg))
    assert summary["steps"] == 3
    info = read_json(tmp_path / "run" / "final" / "ditpipe.json")
    assert info["shards"] == url and info["shards_index_sha256"] == sha256_file(p / "shards" / "index.json")

    # fewer, bigger shards replace the old set: files the new index does not list are removed
    shards(ShardsConfig(max_samples=100), p / "prepared", p / "latents", p / "text", url)
    fs.invalidate_cache()
    assert sorted(name.rsplit("/", 1)[1] for name in fs.ls(url.removeprefix("s3://"), detail=False)) == [
        "empty_caption.safetensors", "index.json", "train-000000.tar", "val-000000.tar"]
