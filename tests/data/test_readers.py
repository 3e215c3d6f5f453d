"""Hostile datasets: every bad record is rejected with its key and reason; nothing escapes the root."""

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ditpipe.config import DataConfig
from ditpipe.data.readers import detect_format, open_source
from ditpipe.errors import DitpipeError


def png(color=(200, 30, 30), size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def read_all(source, **kw):
    fmt, stream = open_source(DataConfig(source=str(source), **kw))
    return fmt, [s.loaded() for s in stream]


def rejects(samples) -> dict[str, str]:
    return {s.key: s.reject for s in samples if s.reject}


def test_imagefolder_jsonl_hostile(tmp_path):
    root = tmp_path / "ds"
    (root / "img").mkdir(parents=True)
    (root / "img" / "good.png").write_bytes(png())
    (root / "img" / "unlisted.png").write_bytes(png((1, 2, 3)))
    (tmp_path / "secret.png").write_bytes(png((9, 9, 9)))
    os.symlink(tmp_path / "secret.png", root / "img" / "link.png")
    lines = [
        json.dumps({"file_name": "img/good.png", "text": "a good one"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"text": "no file"}),
        json.dumps({"file_name": "img/missing.png", "text": "gone"}),
        json.dumps({"file_name": "../secret.png", "text": "escape"}),
        json.dumps({"file_name": str(tmp_path / "secret.png"), "text": "absolute"}),
        json.dumps({"file_name": "img/link.png", "text": "symlink out"}),
    ]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    fmt, samples = read_all(root)
    assert fmt == "imagefolder"
    r = rejects(samples)
    assert r["metadata.jsonl:2"].startswith("unparseable metadata line")
    assert r["metadata.jsonl:3"] == "metadata line is not a JSON object: list"
    assert r["metadata.jsonl:4"] == "metadata row has no 'file_name' field"
    assert r["img/missing"] == "missing file: img/missing.png"
    assert r["../secret"] == "path escapes the dataset root: ../secret.png"
    assert r[str(tmp_path / "secret")].startswith("absolute path not allowed")
    assert r["img/link"] == "symlink points outside the dataset root: img/link.png"
    assert r["img/unlisted"] == "image not listed in metadata.jsonl: img/unlisted.png"
    good = [s for s in samples if not s.reject]
    assert [(s.key, s.caption) for s in good] == [("img/good", "a good one")]
    assert len(samples) == 9


def test_imagefolder_csv_and_sidecars(tmp_path):
    csv_root = tmp_path / "csv"
    csv_root.mkdir()
    (csv_root / "a.png").write_bytes(png())
    (csv_root / "metadata.csv").write_text('file_name,text\na.png,"a red, square"\n')
    _, samples = read_all(csv_root)
    assert [(s.key, s.caption, s.reject) for s in samples] == [("a", "a red, square", None)]

    side = tmp_path / "side"
    (side / "sub").mkdir(parents=True)
    (side / "sub" / "x.png").write_bytes(png())
    (side / "sub" / "x.txt").write_text("caption x\n")
    (side / "y.jpg").write_bytes(png())
    _, samples = read_all(side)
    by_key = {s.key: s for s in samples}
    assert by_key["sub/x"].caption == "caption x\n" and by_key["sub/x"].reject is None
    assert by_key["y"].reject.startswith("no caption: missing file: y.txt")


def _add(tar, name, data=b"", **kw):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if data else None)


def test_webdataset_tar_hostile(tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        _add(tar, "000001.jpg", png())
        _add(tar, "000001.txt", b"first caption")
        _add(tar, "000002.png", png((0, 0, 200)))
        _add(tar, "000002.json", json.dumps({"caption": "from json"}).encode())
        _add(tar, "000003.png", png((0, 200, 0)))  # no caption member
        _add(tar, "../evil.png", png())
        _add(tar, "/etc/passwd.txt", b"root")
        _add(tar, "000004.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _add(tar, "000005.png", type=tarfile.LNKTYPE, linkname="000001.jpg")
        _add(tar, "000006.txt", b"caption without image")
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tar:
        for i in range(5):
            _add(tar, f"1{i:05d}.png", png((i * 40, 0, 0), (64, 64)))
            _add(tar, f"1{i:05d}.txt", b"x")
    (shards / "00001.tar").write_bytes(full.getvalue()[:3000])  # truncated mid-member
    fmt, samples = read_all(shards)
    assert fmt == "webdataset"
    r = rejects(samples)
    assert r["00000.tar:../evil.png"] == "tar member path escapes the archive: ../evil.png"
    assert r["00000.tar:/etc/passwd.txt"] == "tar member path escapes the archive: /etc/passwd.txt"
    assert r["00000.tar:000004.png"] == "tar member is a link: 000004.png -> /etc/passwd"
    assert r["00000.tar:000005.png"].startswith("tar member is a link")
    assert r["000006"].startswith("no image member")
    assert any("truncated or corrupt tar 00001.tar" in v for v in r.values())
    good = {s.key: s.caption for s in samples if not s.reject}
    assert good["000001"] == "first caption" and good["000002"] == "from json"
    assert good["000003"] is None  # prepare rejects it for the missing caption


def test_webdataset_by_fsspec_url_and_brace_pattern(tmp_path):
    for i in range(2):
        with tarfile.open(tmp_path / f"s-{i}.tar", "w") as tar:
            _add(tar, f"k{i}.png", png())
            _add(tar, f"k{i}.txt", b"cap")
    _, samples = read_all(f"file://{tmp_path}/s-{{0..1}}.tar")
    assert sorted(s.key for s in samples) == ["k0", "k1"]


def test_parquet_with_hf_image_struct(tmp_path):
    table = pa.table({
        "image": [{"bytes": png(), "path": "a.png"}, {"bytes": None, "path": None}, {"bytes": png((1, 1, 1)),
                                                                                    "path": "c"}],
        "text": ["one", "two", None],
    })
    pq.write_table(table, tmp_path / "d.parquet")
    fmt, samples = read_all(tmp_path / "d.parquet")
    assert fmt == "parquet"
    assert [s.key for s in samples] == ["d-00000000", "d-00000001", "d-00000002"]
    assert samples[1].reject == "no image bytes or path in column 'image'"
    assert samples[0].caption == "one" and samples[2].caption is None


def test_parquet_with_images_stored_by_path_as_hf_datasets_writes_them(tmp_path):
    """`Dataset.to_parquet` of an image column cast from files writes {bytes: null, path}: read the paths that lie
    inside the dataset root (the parquet file's folder), and say why for the others."""
    root = tmp_path / "ds"
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "a.png").write_bytes(png((200, 0, 0)))
    (root / "imgs" / "b.png").write_bytes(png((0, 200, 0)))
    (tmp_path / "outside.png").write_bytes(png())
    paths = ["imgs/a.png", str(root / "imgs" / "b.png"), "../outside.png", str(tmp_path / "outside.png"),
             "imgs/missing.png"]
    table = pa.table({"image": [{"bytes": None, "path": p} for p in paths], "text": list("abcde")})
    pq.write_table(table, root / "train.parquet")
    _, samples = read_all(root / "train.parquet")
    assert samples[0].data == png((200, 0, 0)) and samples[0].reject is None  # relative to the parquet file
    assert samples[1].data == png((0, 200, 0)) and samples[1].reject is None  # absolute, inside the root
    assert samples[2].reject == "path escapes the dataset root: ../outside.png"
    assert samples[3].reject == f"image path outside the dataset root {root}: {tmp_path / 'outside.png'}"
    assert samples[4].reject == "missing file: imgs/missing.png"


def test_parquet_missing_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"img": [png()], "text": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(DitpipeError, match="has no column 'image'"):
        read_all(tmp_path / "d.parquet")


def test_detect_format_errors(tmp_path):
    with pytest.raises(DitpipeError, match="does not exist"):
        detect_format(str(tmp_path / "nope"))
    with pytest.raises(DitpipeError, match="unknown builtin dataset"):
        detect_format("builtin:faces")
