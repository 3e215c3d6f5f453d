"""The stage table: one ``run`` per stage, called alike by the CLI, DVC and Prefect.

Each entry takes the whole config, hands the stage only its own section and paths, and returns a
summary dict; ``summary_line`` turns that into the one line printed at the end. The table also says
what each stage reads (``paths`` keys), which ``params.yaml`` sections change its outputs, and, from the
stage module's imports, which source files it runs: ``dvc.yaml`` is checked against it by a test, so
the DVC deps cannot drift from the code.
"""

from __future__ import annotations

import ast
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ditpipe.config import Config

PACKAGE_DIR = Path(__file__).resolve().parent


def _prepare(cfg: Config) -> dict:
    from ditpipe import prepare

    return prepare.run(cfg.data, cfg.paths.prepared, cfg.cluster)


def _vae(cfg: Config) -> dict:
    from ditpipe import vae

    return vae.run(cfg.vae, cfg.paths.prepared, cfg.paths.vae)


def _latents(cfg: Config) -> dict:
    from ditpipe import latents

    return latents.run(cfg.latents, cfg.paths.prepared, cfg.paths.vae, cfg.paths.latents, cfg.cluster)


def _text(cfg: Config) -> dict:
    from ditpipe import text

    return text.run(cfg.text, cfg.paths.prepared, cfg.paths.text, cfg.cluster)


def _shards(cfg: Config) -> dict:
    from ditpipe import shards

    return shards.run(cfg.shards, cfg.paths.prepared, cfg.paths.latents, cfg.paths.text, cfg.paths.shards)


def _train(cfg: Config) -> dict:
    from ditpipe import train
    from ditpipe.config import to_dict

    return train.run(cfg.model, cfg.train, cfg.tracking, cfg.paths.shards, cfg.paths.train, to_dict(cfg),
                     vae_dir=cfg.paths.vae)


def _evaluate(cfg: Config) -> dict:
    from ditpipe import evaluate

    p = cfg.paths
    return evaluate.run(cfg.evaluate, cfg.tracking, p.train, p.shards, p.vae, p.prepared, p.reference, p.evaluate,
                        p.metrics, p.plots)


def _export(cfg: Config) -> dict:
    from ditpipe import export

    p = cfg.paths
    return export.run(p.train, p.vae, p.evaluate, p.metrics, p.export)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: what it reads, which params change its outputs, and how to run it."""

    name: str
    inputs: tuple[str, ...]  # ``paths`` keys of the artifacts it reads
    params: tuple[str, ...]  # ``params.yaml`` sections its outputs depend on (``tracking`` never does)
    run: Callable[[Config], dict]

    @property
    def code(self) -> tuple[str, ...]:
        """Repo-relative source files the stage runs: its module and everything it imports from ditpipe."""
        return code_deps(f"ditpipe.{self.name}")


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", (), ("data",), _prepare),
    Stage("vae", ("prepared",), ("vae",), _vae),
    Stage("latents", ("prepared", "vae"), ("latents",), _latents),
    Stage("text", ("prepared",), ("text",), _text),
    Stage("shards", ("prepared", "latents", "text"), ("shards",), _shards),
    Stage("train", ("shards", "vae"), ("model", "train"), _train),  # vae: in-run sample grids decode with it
    Stage("evaluate", ("train", "shards", "vae", "prepared"), ("evaluate",), _evaluate),
    Stage("export", ("train", "vae", "evaluate", "metrics"), (), _export),
)}
ORDER = tuple(STAGES)


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != PACKAGE_DIR.name:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    """ditpipe modules ``path`` imports anywhere (top level or inside functions), with their packages."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # kept only where it is a module
    with_parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 2)}
    return {m for m in with_parents if _module_file(m) is not None}


@functools.cache
def code_deps(module: str) -> tuple[str, ...]:
    """Sorted repo-relative files of ``module`` and every ditpipe module it imports, transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_imported_modules(_module_file(name), name) - seen)
    root = PACKAGE_DIR.parent
    return tuple(sorted(_module_file(m).relative_to(root).as_posix() for m in seen))


def summary_line(stage: str, summary: dict) -> str:
    """The stage module's one-line summary of its result."""
    return importlib.import_module(f"ditpipe.{stage}").summary_line(summary)


OWN_RUNS = ("train", "evaluate")  # stages that open MLflow runs of their own (under the pipeline run)


def run_stage(stage: str, cfg: Config) -> dict:
    """Run one stage, recorded in MLflow as a child of its execution's pipeline run (main process only)."""
    import os

    from ditpipe import tracking
    from ditpipe.config import to_dict

    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    if int(os.environ.get("RANK", "0")) != 0:  # other DDP ranks: rank 0 records the stage
        return STAGES[stage].run(cfg)
    resolved = to_dict(cfg)
    section = {name: resolved[name] for name in STAGES[stage].params}
    with tracking.stage_run(cfg.tracking, stage, section, own_run=stage in OWN_RUNS) as record:
        record.summary = STAGES[stage].run(cfg)
    return record.summary
