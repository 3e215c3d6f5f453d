"""The ``ditpipe`` command: one subcommand per stage, plus ``params`` and ``all``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ditpipe.errors import DitpipeError

STAGE_HELP = {
    "prepare": "read data.source, verify and normalize images, split train/val, report rejections",
    "vae": "load vae.pretrained, or train a small AutoencoderKL on the prepared images",
    "latents": "encode prepared images with the VAE into a content-keyed latent cache",
    "text": "encode every unique caption (and the empty caption) with the text encoder",
    "shards": "pack latents + text embeddings into webdataset tar shards with an index",
    "train": "train (or resume) the denoiser from the shards; logs to metrics.jsonl and MLflow",
}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", metavar="FILE",
                   help="params file (default: params.yaml; missing = built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one param, e.g. --set data.resolution=64 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from ditpipe.stages import ORDER

    parser = argparse.ArgumentParser(
        prog="ditpipe",
        description="Dataset-to-model workflow for text-to-image Diffusion Transformers. "
        "Each stage reads params.yaml; `dvc repro` runs the out-of-date ones.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in ORDER:
        _config_args(sub.add_parser(stage, help=STAGE_HELP[stage], description=STAGE_HELP[stage]))
    _config_args(sub.add_parser("all", help="run every stage in order (without DVC)"))
    p = sub.add_parser("params", help="list every param with its default and meaning, or the resolved values")
    _config_args(p)
    p.add_argument("--resolved", action="store_true", help="print the resolved config as YAML instead")
    return parser


def _print_params(args: argparse.Namespace) -> None:
    import yaml

    from ditpipe.config import describe, load_config, to_dict

    if args.resolved:
        cfg = load_config(args.params, args.overrides)
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return
    for key, default, help in describe():
        print(f"{key:28} {str(default):22} {help}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("DITPIPE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "params":
            _print_params(args)
            return 0
        from ditpipe.config import load_config
        from ditpipe.stages import ORDER, run_stage, summary_line

        cfg = load_config(args.params, args.overrides)  # every key checked before any work
        for stage in ORDER if args.command == "all" else (args.command,):
            print(summary_line(stage, run_stage(stage, cfg)), flush=True)
    except DitpipeError as exc:
        print(f"ditpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ditpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
