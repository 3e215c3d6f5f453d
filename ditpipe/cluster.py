"""Parts of a per-sample stage, run in this process or as tasks on a Dask cluster.

A stage splits its samples into ``cluster.parts`` parts by a hash of each sample's key (so a sample's part
never changes when the dataset grows) and hands each part to :func:`run_parts` as a plain function call
on paths and keys: the inputs and outputs travel through the stage's files and content-keyed cache,
never as task results. On Dask each part is a task with retries; a worker that dies mid-part has its part
run again elsewhere, and since every cache entry is written atomically under a content key, a part
that runs twice writes nothing twice. Each worker gets its share of the machine's cores for torch
(two torch processes that each take every core thrash).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from tqdm import tqdm

from ditpipe.config import ClusterConfig
from ditpipe.errors import DitpipeError


def part_of(key: str, parts: int) -> int:
    """The part a sample (or caption) key belongs to: stable whatever else is in the dataset."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % parts


def worker_path(path: str | os.PathLike) -> str:
    """``path`` as a part's argument: absolute, since a worker's working directory may be another one.
    Patterns (braces, globs) are joined to this one as they are; URLs (``file://`` too) and ``builtin:``
    sources pass unchanged."""
    path = str(path)
    if "://" in path or path.startswith("builtin:") or os.path.isabs(path):
        return path
    return os.path.abspath(path)


def _with_threads(threads: int | None, fn: Callable, *args: Any) -> Any:
    if threads:
        import torch

        torch.set_num_threads(threads)
    return fn(*args)


@contextlib.contextmanager
def dask_client(cfg: ClusterConfig) -> Iterator[Any]:
    """A client of the cluster at ``cfg.address``, or of a local cluster of ``cfg.workers`` processes."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise DitpipeError("cluster.engine=dask needs Dask: pip install 'ditpipe[cluster]'") from None
    if cfg.address:
        try:
            client = Client(cfg.address, timeout=5)
        except OSError as exc:
            raise DitpipeError(f"cluster.address {cfg.address} does not answer ({exc}): start the scheduler "
                               "(dask scheduler) and its workers, or leave it empty for a local cluster") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as local, Client(local) as client:
        yield client


def run_parts(cfg: ClusterConfig, fn: Callable, part_args: list[tuple], desc: str) -> list[Any]:
    """``fn(*args)`` for each part: here, one after the other, or as Dask tasks (results in part order)."""
    if cfg.engine == "local" or not part_args:
        return [fn(*args) for args in part_args]
    resources = {"GPU": cfg.gpus_per_part} if cfg.gpus_per_part else None
    with dask_client(cfg) as client:
        workers = max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
        # a local cluster shares this machine's cores; a remote worker keeps its own setting
        threads = None if cfg.address else max(1, (os.cpu_count() or 1) // workers)
        futures = [client.submit(_with_threads, threads, fn, *args, retries=2, resources=resources,
                                 pure=False, key=f"{desc}-part-{i}") for i, args in enumerate(part_args)]
        from distributed import as_completed

        for _ in tqdm(as_completed(futures), total=len(futures), desc=f"{desc} parts on dask", unit="part",
                      disable=None):
            pass
        return client.gather(futures)
