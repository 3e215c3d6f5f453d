"""The ``ditpipe`` command: one subcommand per stage, plus ``params`` and ``all``."""

from __future__ import annotations

import argparse
import errno
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
    "evaluate": "sample the val prompts, then FID/KID, CLIP score and compositional accuracy; grids and plots",
    "export": "write the run as a diffusers pipeline folder (DitpipePipeline) with a model card",
}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", metavar="FILE",
                   help="params file (default: params.yaml; missing = built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one param, e.g. --set data.resolution=64 (repeatable)")
    p.add_argument("--wait", action="store_true", help="if another command is writing the same output, wait for "
                   "it to finish instead of failing (same as DITPIPE_WAIT=1)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (same as "
                   "DITPIPE_DEBUG=1)")


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
    m = sub.add_parser("models", help="list model presets with parameters and GFLOPs per forward pass",
                       description="Every arch x size preset with its parameter count and forward GFLOPs "
                       "(multiply-accumulates per image, the DiT paper's unit). --class-conditional gives the "
                       "DiT paper's setting: 1000 classes, learned sigma, no text.")
    m.add_argument("--resolution", type=int, default=256, help="image side in pixels (default 256)")
    m.add_argument("--downsample", type=int, default=8, help="VAE downsampling factor (default 8)")
    m.add_argument("--latent-channels", type=int, default=4)
    m.add_argument("--text-dim", type=int, default=384, help="caption embedding width (default 384, MiniLM)")
    m.add_argument("--max-length", type=int, default=77, help="caption tokens (default 77)")
    m.add_argument("--class-conditional", action="store_true", help="the DiT paper's ImageNet setting")
    m.add_argument("--arch", action="append", choices=["dit", "cross", "mmdit", "unet"], help="only these archs")
    m.add_argument("--patch", type=int, action="append", choices=[1, 2, 4, 8], help="patch sizes (default 2)")
    m.add_argument("--no-tokens", action="store_true",
                   help="dit reads only the pooled caption (model.tokens=false), not its tokens too")
    m.add_argument("--mlp-conv", type=int, default=None,
                   help="dit's model.mlp_conv (default: as params.yaml; 0 with --class-conditional, as the paper)")
    g = sub.add_parser("generate", help="draw images of a prompt from a finished run",
                       description="Draw images of PROMPT from a finished run (its EMA weights, VAE and text "
                       "encoder). --out x.png writes a grid with the prompt under each image; --out a folder writes "
                       "the images at full resolution with metadata.jsonl.")
    g.add_argument("prompt", help='e.g. "a large red circle above a small blue square"')
    g.add_argument("--out", default="generated.png", help="a .png file (a captioned grid) or a folder (default: "
                   "generated.png)")
    g.add_argument("--n", type=int, default=8, help="images to draw (default 8)")
    g.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (default 4; 1 = off)")
    g.add_argument("--steps", type=int, default=30, help="sampler steps (default 30)")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    g.add_argument("--sampler", default="auto", help="auto, euler, heun (rectified_flow runs); ddpm, ddim, dpmpp "
                   "(ddpm runs)")
    g.add_argument("--run", default=None, help="run folder or its final/ (default: paths.train of the params)")
    g.add_argument("--vae", default=None, help="VAE folder (default: the run's paths.vae)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    _config_args(g)
    c = sub.add_parser("compare", help="queue and run DVC experiments over arch x size x objective; print a table",
                       description="Backbones against each other on the same cached shards: one DVC experiment "
                       "per --arch x --size x --objective (`dvc exp run --queue -S ...`), run with `dvc exp run "
                       "--run-all`, then one table (params, GFLOPs/img, training time, img/s, FID, KID, judged "
                       "accuracy) in OUT/compare.md, all figures in OUT/compare.json and accuracy vs training FLOPs "
                       "in OUT/compare.png. --set KEY=VALUE applies to every experiment. Data stages are not "
                       "re-run: DVC restores them from its cache.")
    c.add_argument("--arch", action="append", help="dit, cross, mmdit or unet (repeatable; default: all four)")
    c.add_argument("--size", action="append", help="PRESET/PATCH, e.g. XS/4 (repeatable; default: model.size)")
    c.add_argument("--objective", action="append", help="rectified_flow or ddpm (repeatable; default: "
                   "train.objective)")
    c.add_argument("--out", default="artifacts/compare", help="folder for the table and plot (default "
                   "artifacts/compare)")
    c.add_argument("--jobs", type=int, default=1, help="experiments run side by side (default 1: on a CPU, more "
                   "thrash)")
    c.add_argument("--prefix", default="cmp", help="experiment names are PREFIX-ARCH-SIZE-OBJECTIVE (default cmp)")
    c.add_argument("--no-run", dest="execute", action="store_false",
                   help="only read back experiments that already ran and redraw the table")
    _config_args(c)
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


def _print_models(args: argparse.Namespace) -> None:
    from ditpipe.models import MODEL, Spec, preset_table

    if args.resolution % args.downsample:
        raise DitpipeError(f"--resolution {args.resolution} is not a multiple of --downsample {args.downsample}")
    size = args.resolution // args.downsample
    if args.class_conditional:
        spec, archs = Spec(args.latent_channels, size, 0, num_classes=1000, learn_sigma=True), ("dit",)
    else:
        spec, archs = Spec(args.latent_channels, size, args.text_dim), tuple(args.arch or ("dit", "cross", "mmdit",
                                                                                              "unet"))
    what = "class-conditional, 1000 classes" if args.class_conditional else f"text {args.text_dim}-d"
    print(f"{args.resolution}px images -> {args.latent_channels}x{size}x{size} latents, {what}")
    print(f"{'arch':6} {'size':6} {'tokens':>6} {'params':>10} {'GFLOPs':>9}")
    mlp_conv = args.mlp_conv if args.mlp_conv is not None else 0 if args.class_conditional else MODEL.mlp_conv
    for r in preset_table(spec, archs, tuple(args.patch or (2,)), args.max_length, not args.no_tokens, mlp_conv):
        tokens = r["tokens"] if r["tokens"] is not None else "-"
        print(f"{r['arch']:6} {r['size']:6} {tokens:>6} {r['params_m']:9.2f}M {r['gflops']:9.2f}")


def _generate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ditpipe.config import load_config
    from ditpipe.generate import generate
    from ditpipe.grids import caption_grid

    if args.n < 1 or args.steps < 1 or args.cfg < 1.0:
        raise DitpipeError(f"--n and --steps must be >= 1 and --cfg >= 1; got --n {args.n} --steps {args.steps} "
                           f"--cfg {args.cfg}")
    run = args.run or load_config(args.params, args.overrides).paths.train
    images = generate(run, args.prompt, n=args.n, guidance_scale=args.cfg, steps=args.steps, seed=args.seed,
                      sampler=args.sampler, vae_dir=args.vae, device=args.device)
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        caption_grid(images, [f"seed {args.seed + i}" for i in range(len(images))],
                     title=f"{args.prompt} | cfg {args.cfg}, {args.steps} steps").save(out)
    else:
        import json

        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metadata.jsonl", "a") as f:
            for i, img in enumerate(images):
                name = f"{args.seed + i:05d}.png"
                img.save(out / name)
                f.write(json.dumps({"file_name": name, "text": args.prompt, "seed": args.seed + i,
                                    "guidance_scale": args.cfg, "steps": args.steps, "sampler": args.sampler}) + "\n")
    print(f"generate: {len(images)} images of {args.prompt!r} -> {out}")


def _compare(args: argparse.Namespace) -> None:
    from ditpipe import compare
    from ditpipe.config import load_config
    from ditpipe.tracking import tracking_uri

    cfg = load_config(args.params, args.overrides)
    if args.jobs < 1:
        raise DitpipeError(f"--jobs must be >= 1, got {args.jobs}")
    exps = compare.plan(args.arch or ["dit", "cross", "mmdit", "unet"], args.size or [cfg.model.size],
                        args.objective or [cfg.train.objective], args.prefix)
    uri = tracking_uri(cfg.tracking) if cfg.tracking.enabled else None
    rows = compare.run(exps, args.overrides, args.out, jobs=args.jobs, execute=args.execute, tracking_uri=uri)
    print(compare.markdown(rows), end="")
    print(f"compare: {sum(r['ok'] for r in rows)}/{len(rows)} experiments measured -> {args.out}/compare.md, "
          "compare.json, compare.png")


IO_HINTS = {
    errno.ENOSPC: "the disk is full: free some space, or point paths.* at a bigger disk",
    errno.EDQUOT: "the disk quota is used up: free some space, or point paths.* elsewhere",
    errno.EACCES: "no permission: fix the folder's permissions, or point paths.* somewhere writable",
    errno.EPERM: "not permitted: fix the folder's permissions, or point paths.* somewhere writable",
    errno.EROFS: "the file system is read-only: point paths.* somewhere writable",
    errno.ENOENT: "it does not exist: check the path, or run the stage that writes it (`dvc repro`)",
    errno.ENOTDIR: "a file stands where a folder should be: move it, or point paths.* elsewhere",
    errno.EISDIR: "a folder stands where a file should be: move it, or point paths.* elsewhere",
    errno.EIO: "the disk reported an I/O error: check the device",
}


def one_line(exc: BaseException) -> str:
    """An error as the one line the CLI prints: OS errors with the path and what to do; errors raised in a
    DataLoader worker without the worker's traceback that torch folds into the message."""
    if isinstance(exc, OSError) and not isinstance(exc, DitpipeError):
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        what = exc.strerror or str(exc)
        hint = IO_HINTS.get(exc.errno or 0, "")
        return f"{what}{f': {where}' if where else ''}{f' ({hint})' if hint else ''}"
    text = str(exc)
    if "Original Traceback" in text:  # torch.utils.data re-raises worker errors with the traceback inside
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or bool(os.environ.get("DITPIPE_DEBUG"))
    if getattr(args, "wait", False):
        from ditpipe.io import WAIT_ENV

        os.environ[WAIT_ENV] = "1"  # read where the lock is taken, in this process and in launched ranks
    logging.basicConfig(level=os.environ.get("DITPIPE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "params":
            _print_params(args)
            return 0
        if args.command == "models":
            _print_models(args)
            return 0
        if args.command == "generate":
            _generate(args)
            return 0
        if args.command == "compare":
            _compare(args)
            return 0
        from ditpipe.config import load_config
        from ditpipe.stages import ORDER, run_stage, summary_line

        cfg = load_config(args.params, args.overrides)  # every key checked before any work
        main_process = int(os.environ.get("RANK", "0")) == 0  # one summary line, not one per rank
        for stage in ORDER if args.command == "all" else (args.command,):
            summary = run_stage(stage, cfg)
            if main_process:
                print(summary_line(stage, summary), flush=True)
    except (DitpipeError, OSError) as exc:  # the user's input, config, artifacts or disk: one line, no traceback
        if debug:
            raise
        print(f"ditpipe {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ditpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
