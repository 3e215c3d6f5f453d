import io
import json
import os
from pathlib import Path

from PIL import Image

from ditpipe.config import DataConfig
from ditpipe.data.readers import RawSample
from ditpipe.prepare import Tally, prepare_samples, run, safe_key, split_of


def png(color, size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_core_rejects_duplicates_and_bad_captions():
    raws = [
        RawSample("a", data=png((255, 0, 0)), caption="red"),
        RawSample("b", data=png((255, 0, 0)), caption="red again"),  # same pixels
        RawSample("a", data=png((0, 255, 0)), caption="same key"),
        RawSample("c", data=png((0, 0, 255)), caption="   "),
        RawSample("d", data=png((0, 0, 255)), caption=None),
        RawSample("e", data=png((0, 0, 255)), caption=42),
        RawSample("f", data=b"", caption="empty"),
        RawSample("g", reject="missing file: g.png"),
        RawSample("h", data=png((1, 2, 3)), caption="  a   spaced\ncaption "),
    ]
    tally = Tally()
    out = list(prepare_samples(raws, DataConfig(), tally))
    assert [(a.key, a.caption) for a, _ in out] == [("a", "red"), ("h", "a spaced caption")]
    report = tally.report()
    assert report["seen"] == 9 and report["accepted"] == 2 and report["rejected"] == 7
    reasons = {r["key"]: r["reason"] for r in report["rejects"]}
    assert reasons["b"] == "duplicate image: same pixels as a"
    assert reasons["a"] == "duplicate key: a"
    assert reasons["c"] == "empty caption" and reasons["d"] == "no caption"
    assert reasons["e"] == "caption is not text: int"
    assert reasons["f"] == "empty file (0 bytes)" and reasons["g"] == "missing file: g.png"


def test_split_is_deterministic_and_near_the_fraction():
    keys = [f"k{i}" for i in range(4000)]
    splits = [split_of(k, 0.1) for k in keys]
    assert splits == [split_of(k, 0.1) for k in keys]
    assert 300 < splits.count("val") < 500
    assert all(split_of(k, 0.0) == "train" for k in keys[:100])


def test_safe_key_is_unique_and_tar_safe():
    raw = ["images/1f3b3", "images_1f3b3", "a.b", "a_b", "ok-key_1"]
    keys = [safe_key(k) for k in raw]
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k for k in keys)
    assert safe_key("ok-key_1") == "ok-key_1"


def test_run_on_hostile_folder_reports_everything_and_writes_nowhere_else(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "ok.png").write_bytes(png((10, 200, 10)))
    (root / "bad.png").write_bytes(b"\x89PNG garbage")
    (root / "tiny.png").write_bytes(png((1, 1, 1), (4, 4)))
    (root / "metadata.jsonl").write_text("\n".join([
        json.dumps({"file_name": "ok.png", "text": "green"}),
        json.dumps({"file_name": "bad.png", "text": "broken"}),
        json.dumps({"file_name": "tiny.png", "text": "tiny"}),
        json.dumps({"file_name": "../../etc/passwd", "text": "escape"}),
        "oops",
    ]) + "\n")
    before = sorted(p for p in tmp_path.rglob("*"))
    out = tmp_path / "out" / "prepared"
    summary = run(DataConfig(source=str(root), resolution=16, min_size=8), out)
    report = json.loads((out / "report.json").read_text())
    assert report["seen"] == report["accepted"] + report["rejected"] == 5
    assert report["accepted"] == 1 and summary["accepted"] == 1
    reasons = {r["key"]: r["reason"] for r in report["rejects"]}
    assert reasons["bad"].startswith("not a decodable image")
    assert reasons["tiny"].startswith("too small")
    assert reasons["../../etc/passwd"].startswith("path escapes the dataset root")
    assert reasons["metadata.jsonl:5"].startswith("unparseable metadata line")
    after = sorted(p for p in tmp_path.rglob("*") if not str(p).startswith(str(tmp_path / "out")))
    assert before == after  # nothing written outside the output folder
    assert sorted(os.listdir(out)) == ["images", "meta.json", "report.json", "samples.jsonl"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["ok"]
    assert Image.open(out / rows[0]["file"]).size == (16, 16)


def test_run_twemoji_real_rgba(twemoji_subset: Path, tmp_path):
    out = tmp_path / "prepared"
    s = run(DataConfig(source=str(twemoji_subset), background="black", val_fraction=0.2), out)
    assert s["seen"] == 40 and s["accepted"] == 40 and s["rejected"] == 0
    assert s["splits"]["train"] + s["splits"]["val"] == 40
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    img = Image.open(out / rows[0]["file"])
    assert img.mode == "RGB" and img.size == (32, 32)
    assert max(img.getpixel((0, 0))) < 12  # transparent corner composited over black
    assert all("emoji" in r["caption"] for r in rows)


def test_limit_and_rerun_is_identical(tmp_path):
    cfg = DataConfig(count=30, limit=12)
    a = run(cfg, tmp_path / "a")
    b = run(cfg, tmp_path / "b")
    assert a["seen"] == 12
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (tmp_path / "b" / "samples.jsonl").read_text()
    assert b["accepted"] == 12


def test_no_usable_sample_is_an_error_naming_the_report_and_the_old_output_stays(tmp_path):
    import pytest

    from ditpipe.errors import DitpipeError

    out = tmp_path / "artifacts" / "prepared"
    run(DataConfig(count=8, resolution=16), out)  # a good earlier run
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    root = tmp_path / "ds"
    root.mkdir()
    (root / "a.png").write_bytes(b"not an image")
    (root / "b.png").write_bytes(b"\x89PNG cut")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a"}) + "\n"
                                         + json.dumps({"file_name": "b.png", "text": "b"}) + "\n")
    with pytest.raises(DitpipeError, match=r"all 2 samples were rejected \(2 x not a decodable image") as exc:
        run(DataConfig(source=str(root), resolution=16), out)
    kept = tmp_path / "artifacts" / "prepared.rejected.json"
    assert str(kept) in str(exc.value) and json.loads(kept.read_text())["rejected"] == 2
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the good run is untouched
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp")] == []
    for f in root.iterdir():
        f.unlink()
    (root / "metadata.jsonl").write_text("")
    with pytest.raises(DitpipeError, match="it holds no samples"):
        run(DataConfig(source=str(root), resolution=16), out)


def write_tar(path, samples) -> None:
    """A webdataset tar of (key, image bytes, caption) samples."""
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for name, data in ((f"{key}.png", image), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_parts_deduplicate_in_source_order_and_write_what_one_process_writes(tmp_path, monkeypatch):
    """Checked in 3 parts (run here, one after another, instead of as Dask tasks: the merge is what is under
    test), the prepared folder is byte for byte the in-process one, duplicates across parts included. The
    order matters: "b" is first a copy of "a"'s pixels (rejected), then a sample of its own (kept)."""
    from ditpipe import prepare
    from ditpipe.config import ClusterConfig

    write_tar(tmp_path / "data.tar", [("a", png((255, 0, 0)), "red"), ("b", png((255, 0, 0)), "red again"),
                                      ("c", png((0, 0, 255)), "blue"), ("b", png((0, 255, 0)), "green b"),
                                      ("d", b"\x89PNG garbage", "broken"), ("a", png((9, 9, 9)), "a again"),
                                      *((f"k{i}", png((i, 100, 200 - i)), f"colour {i}") for i in range(12))])
    cfg = DataConfig(source=str(tmp_path / "data.tar"), resolution=16, min_size=8, val_fraction=0.3)
    local = run(cfg, tmp_path / "local")
    monkeypatch.setattr(prepare, "run_parts", lambda cluster, fn, args, desc: [fn(*a) for a in args])
    parted = run(cfg, tmp_path / "parted", ClusterConfig(engine="dask", parts=3))
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "parted") for p in (tmp_path / "parted").rglob("*"))
    assert all((tmp_path / "local" / f).read_bytes() == (tmp_path / "parted" / f).read_bytes()
               for f in files if (tmp_path / "local" / f).is_file())
    assert {prepare.part_of(k, 3) for k in "abcd"} != {0}  # the duplicates did land in other parts
    assert local["seen"] == parted["seen"] == 18 and parted["accepted"] == 15
    rows = {r["key"]: r["caption"] for r in map(json.loads, open(tmp_path / "parted" / "samples.jsonl"))}
    assert rows["b"] == "green b" and rows["a"] == "red" and "d" not in rows
    reasons = [r["reason"] for r in json.load(open(tmp_path / "parted" / "report.json"))["rejects"]]
    assert reasons[0] == "duplicate image: same pixels as a" and reasons[2] == "duplicate key: a"


def test_parts_run_from_another_working_directory_with_a_relative_brace_pattern(tmp_path, monkeypatch):
    """A remote worker does not share this process's working directory: every path a part gets is absolute,
    a relative brace pattern included, so a part run from elsewhere finds the same samples."""
    from ditpipe import prepare
    from ditpipe.config import ClusterConfig

    (tmp_path / "src").mkdir()
    for i in range(2):
        write_tar(tmp_path / "src" / f"part-{i}.tar", [(f"s{i}{j}", png((i * 90, j * 40, 50)), f"c{i}{j}")
                                                      for j in range(4)])
    (tmp_path / "elsewhere").mkdir()

    def parts_elsewhere(cluster, fn, args, desc):
        here = os.getcwd()
        os.chdir(tmp_path / "elsewhere")
        try:
            return [fn(*a) for a in args]
        finally:
            os.chdir(here)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare, "run_parts", parts_elsewhere)
    cfg = DataConfig(source="src/part-{0..1}.tar", resolution=16, min_size=8, val_fraction=0.25)
    s = run(cfg, "prepared", ClusterConfig(engine="dask", parts=2))
    assert s["seen"] == s["accepted"] == 8
    assert len(list((tmp_path / "prepared" / "images").iterdir())) == 8


def test_a_part_draws_and_reads_only_its_own_share(tmp_path, monkeypatch):
    """A part lists every key of the source but draws (builtin:shapes) or reads (an imagefolder) only the samples
    of its share; the parts together cover each sample once."""
    from ditpipe.data import readers, shapes
    from ditpipe.prepare import check_samples, part_of

    drawn: list[int] = []
    draw = shapes.draw_sample
    monkeypatch.setattr(shapes, "draw_sample", lambda seed, i, res: drawn.append(i) or draw(seed, i, res))
    cfg = DataConfig(source="builtin:shapes", count=40, resolution=16)
    for part in range(4):
        drawn.clear()
        out = list(check_samples(readers.read_shapes(cfg.source, cfg), cfg, part, 4))
        assert [shapes.key_of(i) for i in drawn] == [c.raw_key for c in out]
        assert all(part_of(c.raw_key, 4) == part for c in out) and 0 < len(out) < 40

    root = tmp_path / "folder"
    root.mkdir()
    for i in range(12):
        (root / f"im{i}.png").write_bytes(png((i * 20, 0, 0)))
        (root / f"im{i}.txt").write_text(f"red {i}")
    opened: list[str] = []
    read_file = readers._read_file
    monkeypatch.setattr(readers, "_read_file", lambda r, name: opened.append(name) or read_file(r, name))
    folder = DataConfig(source=str(root), resolution=16, min_size=8)
    seen = []
    for part in range(3):
        opened.clear()
        out = list(check_samples(readers.read_imagefolder(folder.source, folder), folder, part, 3))
        assert sorted(opened) == sorted(f"{c.raw_key}.{ext}" for c in out for ext in ("png", "txt"))
        assert all(c.accepted is not None for c in out)
        seen += [c.raw_key for c in out]
    assert sorted(seen) == sorted(f"im{i}" for i in range(12))
