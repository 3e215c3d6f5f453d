"""Dataset readers: each turns a source into a stream of :class:`RawSample`.

Readers never stop on bad input. A sample they cannot read comes out with ``reject`` set to the
reason, so ``prepare`` can record it. They never read outside the dataset root: paths with ``..``,
absolute paths, symlinks that leave the root and links inside tars are rejected, not followed.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from braceexpand import braceexpand
from PIL import Image

from ditpipe.config import DataConfig
from ditpipe.data import shapes
from ditpipe.errors import DitpipeError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_FILE_BYTES = 256 * 1024 * 1024  # no sane training image is bigger; refuse to read it into memory


@dataclass
class RawSample:
    """One record of a source, before decoding. ``reject`` is set when it is already known bad."""

    key: str
    data: bytes | None = None
    image: Image.Image | None = None  # already-decoded images (builtin:shapes)
    caption: Any = None
    meta: dict = field(default_factory=dict)
    reject: str | None = None
    # The costly part (reading the file, drawing the shape), put off until asked for: a prepare part lists every
    # key of the source to find its share, and should read and draw only that share.
    load: Callable[[], RawSample] | None = field(default=None, repr=False, compare=False)

    def loaded(self) -> RawSample:
        """This sample with its bytes (or image) read."""
        return self.load() if self.load is not None else self


Reader = Callable[[str, DataConfig], Iterator[RawSample]]


# ---------------------------------------------------------------- builtin:shapes


def _shape(seed: int, index: int, resolution: int) -> RawSample:
    key, img, caption, attrs = shapes.draw_sample(seed, index, resolution)
    return RawSample(key, image=img, caption=caption, meta={"attributes": attrs})


def read_shapes(source: str, cfg: DataConfig) -> Iterator[RawSample]:
    for i in range(cfg.count):
        yield RawSample(shapes.key_of(i), load=functools.partial(_shape, cfg.seed, i, cfg.resolution))


# ---------------------------------------------------------------- imagefolder


def _safe_relpath(root: Path, name: str) -> tuple[Path | None, str | None]:
    """Resolve ``name`` inside ``root``; return (path, None) or (None, reason)."""
    if not name or "\x00" in name:
        return None, "empty or invalid file name"
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        return None, f"absolute path not allowed: {name}"
    if ".." in pure.parts:
        return None, f"path escapes the dataset root: {name}"
    path = root.joinpath(*pure.parts)
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        return None, f"symlink points outside the dataset root: {name}"
    return path, None


def _read_file(root: Path, name: str) -> tuple[bytes | None, str | None]:
    path, reason = _safe_relpath(root, name)
    if reason:
        return None, reason
    assert path is not None
    if not path.exists():
        return None, f"missing file: {name}"
    if not path.is_file():
        return None, f"not a regular file: {name}"
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        return None, f"file too large to be an image: {size} bytes"
    return path.read_bytes(), None


def _metadata_rows(meta: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    """(location, row, problem) for every row of metadata.jsonl or metadata.csv."""
    if meta.suffix == ".jsonl":
        with open(meta, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                where = f"{meta.name}:{lineno}"
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield where, None, f"unparseable metadata line: {exc.msg}"
                    continue
                if not isinstance(row, dict):
                    yield where, None, f"metadata line is not a JSON object: {type(row).__name__}"
                    continue
                yield where, row, None
    else:
        with open(meta, encoding="utf-8", errors="replace", newline="") as f:
            for lineno, row in enumerate(csv.DictReader(f), 2):
                yield f"{meta.name}:{lineno}", row, None


def read_imagefolder(source: str, cfg: DataConfig) -> Iterator[RawSample]:
    root = Path(source).resolve()
    if not root.is_dir():
        raise DitpipeError(f"data.source {source!r} is not a directory")
    metas = [root / n for n in ("metadata.jsonl", "metadata.csv") if (root / n).is_file()]
    if metas:
        yield from _read_with_metadata(root, metas[0], cfg)
    else:
        yield from _read_with_sidecars(root)


def _walk_images(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTS):
                yield Path(dirpath, name).relative_to(root).as_posix()


def _read_with_metadata(root: Path, meta: Path, cfg: DataConfig) -> Iterator[RawSample]:
    listed: set[str] = set()
    for where, row, problem in _metadata_rows(meta):
        if problem:
            yield RawSample(where, reject=problem)
            continue
        assert row is not None
        name = row.get(cfg.file_column)
        if not isinstance(name, str) or not name:
            yield RawSample(where, reject=f"metadata row has no {cfg.file_column!r} field")
            continue
        listed.add(PurePosixPath(name.replace("\\", "/")).as_posix())
        extra = {k: v for k, v in row.items() if k not in (cfg.file_column, cfg.caption_column)}
        yield RawSample(_stem(name), load=functools.partial(_listed_file, root, name, row.get(cfg.caption_column),
                                                            extra))
    for rel in _walk_images(root):
        if rel not in listed:
            yield RawSample(_stem(rel), reject=f"image not listed in {meta.name}: {rel}")


def _listed_file(root: Path, name: str, caption: Any, meta: dict) -> RawSample:
    data, reason = _read_file(root, name)
    return RawSample(_stem(name), data=data, caption=caption, meta=meta, reject=reason)


def _sidecar_pair(root: Path, rel: str) -> RawSample:
    data, reason = _read_file(root, rel)
    caption = None
    if reason is None:
        side = Path(rel).with_suffix(".txt").as_posix()
        text, side_reason = _read_file(root, side)
        if side_reason:
            reason = f"no caption: {side_reason}"
        else:
            assert text is not None
            caption = text.decode("utf-8", errors="replace")
    return RawSample(_stem(rel), data=data, caption=caption, reject=reason)


def _read_with_sidecars(root: Path) -> Iterator[RawSample]:
    for rel in _walk_images(root):
        yield RawSample(_stem(rel), load=functools.partial(_sidecar_pair, root, rel))


def _stem(name: str) -> str:
    p = PurePosixPath(name.replace("\\", "/"))
    return p.with_suffix("").as_posix() if p.suffix else p.as_posix()


# ---------------------------------------------------------------- webdataset tars


def _expand(source: str, suffix: str) -> list[tuple[Any, str]]:
    """(filesystem, path) for every file a source names: a file, folder, glob or brace pattern."""
    out: list[tuple[Any, str]] = []
    for url in braceexpand(source):
        fs, path = fsspec.core.url_to_fs(url)
        if fs.isdir(path):
            out += [(fs, p) for p in sorted(fs.find(path)) if p.endswith(suffix)]
        elif any(c in path for c in "*?["):
            out += [(fs, p) for p in sorted(fs.glob(path))]
        elif fs.exists(path):
            out.append((fs, path))
        else:
            raise DitpipeError(f"data.source: {url} does not exist")
    if not out:
        raise DitpipeError(f"data.source {source!r} names no {suffix} files")
    return out


def _tar_key(name: str) -> tuple[str, str]:
    """webdataset's convention: the key ends at the first dot of the file's base name."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _assemble(key: str, files: dict[str, bytes], cfg: DataConfig) -> RawSample:
    img_ext = next((e for e in ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff") if e in files), None)
    caption: Any = None
    if "txt" in files:
        caption = files["txt"].decode("utf-8", errors="replace")
    elif "json" in files:
        try:
            meta = json.loads(files["json"])
            caption = meta.get(cfg.caption_column, meta.get("caption")) if isinstance(meta, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return RawSample(key, reject="unparseable .json caption member")
    if img_ext is None:
        return RawSample(key, reject=f"no image member (found: {', '.join(sorted(files)) or 'nothing'})")
    return RawSample(key, data=files[img_ext], caption=caption)


def _tar_samples(fs: Any, path: str, cfg: DataConfig) -> Iterator[RawSample]:
    label = PurePosixPath(path).name
    current: str | None = None
    files: dict[str, bytes] = {}
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                name = m.name
                pure = PurePosixPath(name)
                if pure.is_absolute() or ".." in pure.parts:
                    yield RawSample(f"{label}:{name}", reject=f"tar member path escapes the archive: {name}")
                    continue
                if m.issym() or m.islnk():
                    yield RawSample(f"{label}:{name}", reject=f"tar member is a link: {name} -> {m.linkname}")
                    continue
                if m.isdir():
                    continue
                if not m.isfile():
                    yield RawSample(f"{label}:{name}", reject=f"tar member is not a regular file: {name}")
                    continue
                if m.size > MAX_FILE_BYTES:
                    yield RawSample(f"{label}:{name}", reject=f"tar member too large: {m.size} bytes")
                    continue
                key, ext = _tar_key(name)
                if key != current:
                    if current is not None:
                        yield _assemble(current, files, cfg)
                    current, files = key, {}
                extracted = tar.extractfile(m)
                assert extracted is not None
                files[ext] = extracted.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        if current is not None:
            yield RawSample(current, reject=f"truncated or corrupt tar {label}: {exc}")
            current = None
        else:
            yield RawSample(label, reject=f"truncated or corrupt tar {label}: {exc}")
    if current is not None:
        yield _assemble(current, files, cfg)


def read_webdataset(source: str, cfg: DataConfig) -> Iterator[RawSample]:
    for fs, path in _expand(source, ".tar"):
        yield from _tar_samples(fs, path, cfg)


# ---------------------------------------------------------------- parquet


def _image_from_path(fs: Any, parquet_path: str, name: str) -> tuple[bytes | None, str | None]:
    """An image a parquet row names by path (Hugging Face ``{bytes: null, path}``): read it only inside the
    dataset root, the parquet file's folder (a relative path from there, or an absolute one that lies in it)."""
    base = posixpath.dirname(parquet_path)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        root = Path(base).resolve()
        if os.path.isabs(name):
            real = Path(os.path.realpath(name))
            if real != root and root not in real.parents:
                return None, f"image path outside the dataset root {root}: {name}"
            name = real.relative_to(root).as_posix()
        return _read_file(root, name)
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "://" in name:
        return None, f"image path outside the dataset root {base}: {name}"
    full = f"{base}/{pure}"
    if not fs.exists(full):
        return None, f"missing file: {name}"
    return fs.cat_file(full), None


def _parquet_image(value: Any, fs: Any, parquet_path: str, column: str) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, reason) for a parquet image cell: raw bytes, or the Hugging Face Image struct."""
    if isinstance(value, dict):  # the Hugging Face Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes") is None and value.get("path"):
            return _image_from_path(fs, parquet_path, str(value["path"]))
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    return None, f"no image bytes or path in column {column!r}"


def _parquet_sample(key: str, cell: Any, caption: Any, fs: Any, parquet_path: str, cfg: DataConfig) -> RawSample:
    data, reason = _parquet_image(cell, fs, parquet_path, cfg.image_column)
    return RawSample(key, data=data, caption=caption, reject=reason)


def read_parquet(source: str, cfg: DataConfig) -> Iterator[RawSample]:
    import pyarrow.parquet as pq

    for fs, path in _expand(source, ".parquet"):
        stem = PurePosixPath(path).stem
        with fs.open(path, "rb") as f:
            try:
                pf = pq.ParquetFile(f)
            except Exception as exc:
                yield RawSample(stem, reject=f"unreadable parquet file: {exc}")
                continue
            names = pf.schema_arrow.names
            for col in (cfg.image_column, cfg.caption_column):
                if col not in names:
                    raise DitpipeError(f"{path} has no column {col!r} (columns: {', '.join(names)})")
            key_col = next((c for c in ("key", "id") if c in names), None)
            cols = [cfg.image_column, cfg.caption_column] + ([key_col] if key_col else [])
            row = 0
            for batch in pf.iter_batches(batch_size=256, columns=cols):
                for rec in batch.to_pylist():
                    key = str(rec[key_col]) if key_col and rec[key_col] is not None else f"{stem}-{row:08d}"
                    row += 1
                    yield RawSample(key, load=functools.partial(
                        _parquet_sample, key, rec[cfg.image_column], rec[cfg.caption_column], fs, path, cfg))


READERS: dict[str, Reader] = {
    "shapes": read_shapes,
    "imagefolder": read_imagefolder,
    "webdataset": read_webdataset,
    "parquet": read_parquet,
}


def detect_format(source: str) -> str:
    """Name the reader for ``source`` (``data.format: auto``)."""
    if source.startswith("builtin:"):
        if source != "builtin:shapes":
            raise DitpipeError(f"data.source: unknown builtin dataset {source!r} (known: builtin:shapes)")
        return "shapes"
    plain = source.split("::")[-1]
    if plain.endswith(".parquet") or plain.endswith(".parquet}"):
        return "parquet"
    if ".tar" in plain:
        return "webdataset"
    fs, path = fsspec.core.url_to_fs(next(iter(braceexpand(source))))
    if not fs.exists(path):
        raise DitpipeError(f"data.source {source!r} does not exist")
    if fs.isdir(path):
        if fs.exists(f"{path}/metadata.jsonl") or fs.exists(f"{path}/metadata.csv"):
            return "imagefolder"
        names = [p for p in fs.find(path)]
        if any(p.endswith(".tar") for p in names):
            return "webdataset"
        if any(p.endswith(".parquet") for p in names):
            return "parquet"
        return "imagefolder"
    raise DitpipeError(f"cannot tell the format of data.source {source!r}; set data.format")


def open_source(cfg: DataConfig) -> tuple[str, Iterator[RawSample]]:
    """The format name and the sample stream for ``cfg``."""
    fmt = detect_format(cfg.source) if cfg.format == "auto" else cfg.format
    if fmt != "shapes" and cfg.source.startswith("builtin:"):
        raise DitpipeError(f"data.format={fmt} does not fit data.source={cfg.source}")
    return fmt, READERS[fmt](cfg.source, cfg)
