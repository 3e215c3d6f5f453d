"""The stage registry: one ``run`` per stage, called alike by the CLI, DVC and Prefect.

Each entry takes the whole config, hands the stage only its own section and paths, and returns a
summary dict; ``SUMMARIES`` turns that into the one line printed at the end.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ditpipe.config import Config

ORDER = ("prepare", "vae", "latents", "text", "shards", "train", "evaluate", "export")


def _prepare(cfg: Config) -> dict:
    from ditpipe import prepare

    return prepare.run(cfg.data, cfg.paths.prepared)


def _vae(cfg: Config) -> dict:
    from ditpipe import vae

    return vae.run(cfg.vae, cfg.paths.prepared, cfg.paths.vae)


def _latents(cfg: Config) -> dict:
    from ditpipe import latents

    return latents.run(cfg.latents, cfg.paths.prepared, cfg.paths.vae, cfg.paths.latents)


def _text(cfg: Config) -> dict:
    from ditpipe import text

    return text.run(cfg.text, cfg.paths.prepared, cfg.paths.text)


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


STAGES: dict[str, Callable[[Config], dict]] = {
    "prepare": _prepare,
    "vae": _vae,
    "latents": _latents,
    "text": _text,
    "shards": _shards,
    "train": _train,
    "evaluate": _evaluate,
    "export": _export,
}


def summary_line(stage: str, summary: dict) -> str:
    """The stage module's one-line summary of its result."""
    return importlib.import_module(f"ditpipe.{stage}").summary_line(summary)


def run_stage(stage: str, cfg: Config) -> dict:
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    return STAGES[stage](cfg)
