"""Small I/O helpers shared by the stages: atomic writes, hashing, JSON lines, locks, devices."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import torch

from ditpipe.errors import DitpipeError

TMP_PREFIX = ".tmp-"
WAIT_ENV = "DITPIPE_WAIT"  # set (the CLI's --wait does) to queue behind a running writer instead of failing
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_url(path: str | Path) -> bool:
    """A remote location (``s3://``, ``gs://``, ... through fsspec), not a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def location(path: str | Path) -> str | Path:
    """A local path as a Path, a URL as it is (``Path`` would fold ``s3://`` into ``s3:/``)."""
    return str(path).rstrip("/") if is_url(path) else Path(path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with (fsspec.open(str(path), "rb") if is_url(path) else open(path, "rb")) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pixel_hash(img) -> str:
    """Content identity of a normalized (PIL) image: its pixels, not its encoding. ``prepare`` records it per
    sample; whoever reads a prepared image checks it."""
    return sha256_bytes(f"{img.mode}{img.size}".encode() + img.tobytes())


def cache_key(*parts: object) -> str:
    """A stable hex key from the parts that decide a cached value."""
    return sha256_bytes("\x1f".join(str(p) for p in parts).encode())


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Write to a hidden temp file beside ``path``; rename over it only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should read like any other file
    try:
        with os.fdopen(fd, mode) as f:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (what makes a rename inside it durable), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checksum_tree(folder: str | Path, name: str = "checksums.json") -> dict[str, str]:
    """Flush every file of ``folder`` to disk and write ``name`` with their sha256 (flushed too)."""
    folder = Path(folder)
    sums = {}
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and q.name != name):
        fsync_path(p)
        sums[p.relative_to(folder).as_posix()] = sha256_file(p)
    write_json(folder / name, sums)
    fsync_path(folder)
    return sums


def verify_tree(folder: str | Path, name: str = "checksums.json") -> str | None:
    """Why ``folder`` does not match its ``name`` checksums (a missing or changed file), or None if it does."""
    folder = Path(folder)
    try:
        sums = read_json(folder / name)
    except FileNotFoundError:
        return f"it has no {name}"
    except (ValueError, OSError) as exc:
        return f"its {name} is unreadable ({exc})"
    for rel, digest in sums.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if sha256_file(p) != digest:
            return f"{rel} does not match its sha256 (damaged)"
    return None


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: str | Path) -> Iterator[dict]:
    return (row for _, row in read_jsonl_offsets(path))


def read_jsonl_offsets(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(byte offset, row)`` of every row of a JSON-lines file: a row can be read again later by seeking to it."""
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield offset, json.loads(line)
            offset += len(line)


def remove_stale_temps(folder: str | Path) -> int:
    """Delete temp files a killed run left behind; return how many."""
    folder = Path(folder)
    if not folder.exists():
        return 0
    n = 0
    for p in folder.rglob(f"{TMP_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


@contextlib.contextmanager
def scratch_db(folder: str | Path, name: str) -> Iterator[sqlite3.Connection]:
    """A SQLite file under ``folder`` for per-sample state a stage must not hold in memory (SQLite's page cache is
    bounded); deleted on exit. Its temp name lets :func:`remove_stale_temps` remove it if the process is killed."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / f"{TMP_PREFIX}{name}-{os.getpid()}.sqlite"
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=OFF")  # scratch: nothing to recover after a crash
        yield db
    finally:
        db.close()
        path.unlink(missing_ok=True)


class DiskSet:
    """A set of strings in a SQLite scratch file, in insertion order: what a stage must remember per sample
    (distinct captions, the cache entries to keep) without holding it in memory. Use it as a context
    manager: its :func:`scratch_db` file is deleted on exit."""

    def __init__(self, folder: str | Path, name: str):
        self._scope = contextlib.ExitStack()
        self.db = self._scope.enter_context(scratch_db(folder, name))
        self.db.execute("CREATE TABLE items (item TEXT PRIMARY KEY)")
        self.size = 0

    def add(self, item: str) -> bool:
        """Add ``item``; True if it was new."""
        new = self.db.execute("INSERT OR IGNORE INTO items VALUES (?)", (item,)).rowcount == 1
        self.size += new
        return new

    def __contains__(self, item: object) -> bool:
        return self.db.execute("SELECT 1 FROM items WHERE item = ?", (item,)).fetchone() is not None

    def __iter__(self) -> Iterator[str]:
        return (item for (item,) in self.db.execute("SELECT item FROM items ORDER BY rowid"))

    def __len__(self) -> int:
        return self.size

    def __enter__(self) -> DiskSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self._scope.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
except (AttributeError, OSError):
    _renameat2 = None


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so that at every instant
    each name holds one of the two. False where the kernel or the filesystem cannot (the caller falls back)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False  # not supported here (old kernel, some network and FUSE filesystems)
    raise OSError(err, os.strerror(err), str(b))


def recover_staged(final: Path) -> None:
    """Undo what a killed ``staged_dir`` left: put the previous output back if the kill fell between its two
    renames, and delete the temp folders of processes that are gone (their pid is in the name)."""
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
    if old.exists():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    for tmp in final.parent.glob(f"{TMP_PREFIX}{final.name}-*"):
        pid = tmp.name[len(f"{TMP_PREFIX}{final.name}-"):].split("-", 1)[0]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def lock_path(folder: str | Path) -> Path:
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def describe_holder(h: dict) -> str:
    return f"pid {h.get('pid', '?')} ({h.get('command', '?')}, since {h.get('since', '?')})"


@contextlib.contextmanager
def exclusive(folder: str | Path) -> Iterator[None]:
    """One writer for ``folder`` (a run folder, a cache, a stage's output) at a time.

    A POSIX record lock (``lockf``) on ``.NAME.lock`` beside the folder, which holds the writer's PID and
    command line: a second writer fails at once naming the first (or waits, with ``DITPIPE_WAIT=1``). The
    kernel drops the lock when its process dies, so a killed run's lock is simply taken over; forked
    DataLoader workers do not inherit it.
    """
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = describe_holder(_holder(fd))
            if not os.environ.get(WAIT_ENV):
                raise DitpipeError(f"{folder} is in use by {holder}: let it finish (or stop it), or pass --wait "
                                   "to start when it does") from None
            print(f"waiting for {holder} to finish with {folder}", file=sys.stderr, flush=True)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        stale = _holder(fd)
        if stale.get("pid") not in (None, os.getpid()):
            print(f"taking over {path} from {describe_holder(stale)}, which ended without releasing it",
                  file=sys.stderr, flush=True)
        me = {"pid": os.getpid(), "command": " ".join(sys.argv)[:300], "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: the next writer finds no stale holder
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Build a whole output folder under a temp name; swap it in only on success, in one step where the
    filesystem can (readers see the old output or the new one, never neither). One writer at a time."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(final):
        yield from _staged(final)


def _staged(final: Path) -> Iterator[Path]:
    recover_staged(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-{os.getpid()}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        if final.exists() and exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous output; a kill here leaves it to recover_staged
        elif final.exists():
            old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(final)  # a failed write() names no file: say which output it was for
        raise


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; anything else is taken as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def state_dict_hash(module: torch.nn.Module) -> str:
    """Identity of a model's weights: sha256 over names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
