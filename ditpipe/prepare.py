"""Stage ``prepare``: any image+caption source to normalized images, captions and a rejection report.

Output folder (``paths.prepared``), written under a temp name and swapped in whole:

- ``images/<key>.png``: RGB, ``data.resolution`` square
- ``samples.jsonl``: one ``{key, file, caption, split, sha256, meta}`` per accepted sample
- ``report.json``: ``seen = accepted + rejected``, and every rejected key with its reason
- ``meta.json``: source, format, resolution and split counts, for the stages downstream
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import os
import re
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ditpipe.cluster import part_of, run_parts, worker_path
from ditpipe.config import ClusterConfig, DataConfig
from ditpipe.data.images import NormalizeSpec, Rejected, normalize, png_bytes, to_rgb
from ditpipe.data.readers import RawSample, open_source
from ditpipe.errors import DitpipeError
from ditpipe.io import atomic_open, pixel_hash, read_jsonl, scratch_db, sha256_bytes, staged_dir, write_json

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class Accepted:
    key: str
    image: Image.Image | None  # None once written out by a part
    caption: str
    sha256: str
    meta: dict = field(default_factory=dict)


@dataclass
class Checked:
    """A raw sample at place ``seq`` of the source, decoded and normalised (``accepted``) or not (``reason``);
    duplicates are not known yet: that takes every sample before it."""

    seq: int
    raw_key: str
    accepted: Accepted | None = None
    reason: str = ""


def safe_key(raw: str) -> str:
    """A webdataset- and file-name-safe key; altered keys get a hash suffix so they stay unique."""
    clean = _UNSAFE.sub("_", raw).strip("_") or "sample"
    if clean == raw:
        return raw
    return f"{clean[:80]}_{sha256_bytes(raw.encode())[:8]}"


def split_of(key: str, val_fraction: float) -> str:
    """Deterministic split by key hash: the same key lands in the same split on every run."""
    u = int(sha256_bytes(key.encode())[:16], 16) / 2**64
    return "val" if u < val_fraction else "train"


def clean_caption(caption: object) -> str:
    """A usable caption or :class:`Rejected`."""
    if caption is None:
        raise Rejected("no caption")
    if not isinstance(caption, str):
        raise Rejected(f"caption is not text: {type(caption).__name__}")
    text = " ".join(caption.split())
    if not text:
        raise Rejected("empty caption")
    return text


def process(raw: RawSample, spec: NormalizeSpec) -> Accepted:
    """Decode, verify and normalize one raw sample; raise :class:`Rejected` with the reason."""
    if raw.reject:
        raise Rejected(raw.reject)
    caption = clean_caption(raw.caption)
    if raw.image is not None:
        img = to_rgb(raw.image, spec.background)
        if img.size != (spec.resolution, spec.resolution):
            img = img.resize((spec.resolution, spec.resolution), Image.Resampling.BICUBIC)
    else:
        img = normalize(raw.data or b"", spec)
    return Accepted(safe_key(raw.key), img, caption, pixel_hash(img), dict(raw.meta))


@dataclass
class Tally:
    """Running counts of a prepare pass; ``seen == accepted + rejected`` always."""

    seen: int = 0
    accepted: int = 0
    rejects: list[dict] = field(default_factory=list)
    splits: Counter = field(default_factory=Counter)

    def reject(self, key: str, reason: str) -> None:
        self.rejects.append({"key": key, "reason": reason})

    def report(self) -> dict:
        reasons = Counter(r["reason"].split(":")[0] for r in self.rejects)
        return {
            "seen": self.seen,
            "accepted": self.accepted,
            "rejected": len(self.rejects),
            "splits": dict(sorted(self.splits.items())),
            "reasons": dict(reasons.most_common()),
            "rejects": self.rejects,
        }


class Seen:
    """Keys and pixel hashes accepted so far, in SQLite: in memory by default, or in the given connection (a
    :func:`~ditpipe.io.scratch_db`), so that a stage over millions of samples holds none of them."""

    def __init__(self, db: sqlite3.Connection | None = None):
        self.db = db if db is not None else sqlite3.connect(":memory:")
        self.db.execute("CREATE TABLE seen (key TEXT PRIMARY KEY, pixels TEXT UNIQUE)")

    def first_with(self, column: str, value: str) -> str | None:
        """The key of the sample accepted first with this key or these pixels, or None."""
        assert column in ("key", "pixels")
        found = self.db.execute(f"SELECT key FROM seen WHERE {column} = ?", (value,)).fetchone()
        return found[0] if found else None

    def add(self, key: str, pixels: str) -> None:
        self.db.execute("INSERT INTO seen VALUES (?, ?)", (key, pixels))


def check_samples(raws: Iterable[RawSample], cfg: DataConfig, part: int = 0, parts: int = 1) -> Iterator[Checked]:
    """Decode, verify and normalise the raw samples of part ``part`` of ``parts`` (by a hash of the key), up to
    ``data.limit`` samples of the source. The costly half of ``prepare``: a part runs it on its share."""
    spec = NormalizeSpec(cfg.resolution, cfg.min_size, cfg.max_pixels, cfg.background)
    for seq, raw in enumerate(raws):
        if cfg.limit and seq >= cfg.limit:
            break
        if parts > 1 and part_of(raw.key, parts) != part:
            continue
        raw = raw.loaded()  # only now: a part reads (or draws) its own share, not the whole source
        try:
            yield Checked(seq, raw.key, process(raw, spec))
        except Rejected as rej:
            yield Checked(seq, raw.key, reason=rej.reason)


def deduplicated(checked: Iterable[Checked], cfg: DataConfig, tally: Tally,
                 seen: Seen | None = None) -> Iterator[tuple[Checked, str]]:
    """Checked samples in source order in, ``(checked, split)`` of the accepted out; every rejection goes to
    ``tally``. Exact duplicates (same key, or same normalized pixels) keep the first and reject the rest."""
    seen = seen or Seen()
    for item in checked:
        tally.seen += 1
        acc = item.accepted
        if acc is None:
            tally.reject(item.raw_key, item.reason)
            continue
        if seen.first_with("key", acc.key) is not None:
            tally.reject(item.raw_key, f"duplicate key: {acc.key}")
            continue
        if (first := seen.first_with("pixels", acc.sha256)) is not None:
            tally.reject(item.raw_key, f"duplicate image: same pixels as {first}")
            continue
        seen.add(acc.key, acc.sha256)
        split = split_of(acc.key, cfg.val_fraction)
        tally.accepted += 1
        tally.splits[split] += 1
        yield item, split


def prepare_samples(raws: Iterable[RawSample], cfg: DataConfig, tally: Tally,
                    seen: Seen | None = None) -> Iterator[tuple[Accepted, str]]:
    """The core: raw samples in, ``(accepted, split)`` out; rejections go to ``tally``."""
    for item, split in deduplicated(check_samples(raws, cfg), cfg, tally, seen):
        assert item.accepted is not None
        yield item.accepted, split


def part_file(staging: Path, part: int) -> Path:
    return staging / "parts" / f"part-{part:05d}.jsonl"


def prepare_part(cfg: DataConfig, staging: str, part: int, parts: int, progress: bool = False) -> None:
    """Check the samples of one part: each accepted image to ``parts/<seq>.png``, one line per sample (in
    source order) to the part's file, written whole or not at all. Paths in, files out: a Dask task gets
    and gives nothing bigger. A part run again rewrites the same files."""
    work = Path(staging) / "parts"
    _, raws = open_source(cfg)
    with atomic_open(part_file(Path(staging), part), "w") as out:
        for item in tqdm(check_samples(raws, cfg, part, parts), desc="prepare", unit="img",
                         disable=None if progress else True):
            line: dict = {"seq": item.seq, "raw": item.raw_key}
            if (acc := item.accepted) is not None:
                assert acc.image is not None
                (work / f"{item.seq:012d}.png").write_bytes(png_bytes(acc.image))
                line.update(key=acc.key, caption=acc.caption, sha256=acc.sha256, meta=acc.meta)
            else:
                line["reason"] = item.reason
            out.write(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")


def merged(staging: Path, parts: int) -> Iterator[Checked]:
    """Every part's samples back in source order (each part file is in order: a streamed k-way merge)."""
    lines = heapq.merge(*(read_jsonl(part_file(staging, i)) for i in range(parts)), key=lambda r: r["seq"])
    for r in lines:
        acc = Accepted(r["key"], None, r["caption"], r["sha256"], r["meta"]) if "key" in r else None
        yield Checked(r["seq"], r["raw"], acc, r.get("reason", ""))


def no_samples(cfg: DataConfig, report: dict, out_dir: Path) -> DitpipeError:
    """Nothing usable: keep the report beside the untouched output, and say where it is and why."""
    kept = out_dir.with_name(f"{out_dir.name}.rejected.json")
    write_json(kept, report)
    if not report["seen"]:
        why = "it holds no samples"
    else:
        top = "; ".join(f"{n} x {reason}" for reason, n in list(report["reasons"].items())[:3])
        why = f"all {report['seen']} samples were rejected ({top})"
    return DitpipeError(f"data.source={cfg.source}: {why}. Every rejection is in {kept}; {out_dir} was left as it was")


def run(cfg: DataConfig, out_dir: str | Path, cluster: ClusterConfig | None = None) -> dict:
    """Read ``cfg.source``, write the prepared folder to ``out_dir``; return the report summary. The samples
    are checked in parts (one in this process, ``cluster.parts`` on Dask), then deduplicated in source order
    here: the folder is byte for byte the same on any engine."""
    t0 = time.perf_counter()
    cluster = cluster or ClusterConfig()
    fmt, _ = open_source(cfg)  # a format that cannot be told (or a missing folder) fails here, before any part
    source = worker_path(cfg.source)  # a brace or glob pattern too
    tally = Tally()
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "parts").mkdir()
        parts = 1 if cluster.engine == "local" else cluster.parts
        args = [(dataclasses.replace(cfg, source=source), worker_path(tmp), part, parts, parts == 1)
                for part in range(parts)]
        run_parts(cluster, prepare_part, args, "prepare")
        with open(tmp / "samples.jsonl", "w") as rows, scratch_db(tmp, "seen") as db:  # on disk: memory stays flat
            checked = tqdm(merged(tmp, parts), desc="prepare: merge parts", unit="img",
                           disable=None if parts > 1 else True)
            for item, split in deduplicated(checked, cfg, tally, Seen(db)):
                acc = item.accepted
                assert acc is not None
                rel = f"images/{acc.key}.png"
                os.replace(tmp / "parts" / f"{item.seq:012d}.png", tmp / rel)
                row = {"key": acc.key, "file": rel, "caption": acc.caption, "split": split,
                       "sha256": acc.sha256, "meta": acc.meta}
                rows.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
        shutil.rmtree(tmp / "parts")  # the part files and the images of rejected duplicates
        report = tally.report()
        write_json(tmp / "report.json", report)
        if not tally.accepted:
            raise no_samples(cfg, report, out_dir)
        meta = {"source": cfg.source, "format": fmt, "resolution": cfg.resolution,
                "count": tally.accepted, "splits": report["splits"]}
        write_json(tmp / "meta.json", meta)
    summary = {k: report[k] for k in ("seen", "accepted", "rejected", "splits", "reasons")}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["out"] = str(out_dir)
    summary["engine"] = cluster.engine
    return summary


def summary_line(s: dict) -> str:
    sp = s["splits"]
    return (f"prepare: {s['accepted']} accepted, {s['rejected']} rejected of {s['seen']} seen "
            f"(train {sp.get('train', 0)}, val {sp.get('val', 0)}) in {s['seconds']}s -> {s['out']} "
            f"(rejections: {s['out']}/report.json)")
