"""``ditpipe compare``: backbones against each other on the same cached shards, as DVC experiments.

One DVC experiment per (``model.arch``, ``model.size``, ``train.objective``): queued with
``dvc exp run --queue -S ...``, run with ``dvc queue start`` (their logs streamed), read back with
``dvc exp show --json``.
The data stages are shared (DVC checks their outputs out of its cache), so each experiment runs only
``train``, ``evaluate`` and ``export``. The result is one table (parameters, GFLOPs per image, training
time, images/s, FID, KID, compositional accuracy) and a plot of judged accuracy against training FLOPs.

The core (``plan``, ``rows``, ``markdown``) touches no files; ``run`` drives ``dvc`` and writes the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ditpipe.errors import DitpipeError

OBJECTIVES = ("rectified_flow", "ddpm")
COLUMNS = ("experiment", "arch", "size", "objective", "params (M)", "GFLOPs/img", "train s", "img/s", "N",
           "FID", "KID", "colour", "shape", "relation", "count")


@dataclass(frozen=True)
class Experiment:
    name: str  # the DVC experiment's name
    arch: str
    size: str
    objective: str

    def overrides(self) -> list[str]:
        return [f"model.arch={self.arch}", f"model.size={self.size}", f"train.objective={self.objective}"]


def plan(archs: list[str], sizes: list[str], objectives: list[str], prefix: str = "cmp") -> list[Experiment]:
    """Every arch x size x objective, named ``PREFIX-ARCH-SIZE-OBJECTIVE``; bad values fail naming the value."""
    from ditpipe.models import ARCHS
    from ditpipe.presets import parse_size

    for a in archs:
        if a not in ARCHS:
            raise DitpipeError(f"--arch must be one of {', '.join(ARCHS)}; got {a!r}")
    for s in sizes:
        parse_size(s)
    for o in objectives:
        if o not in OBJECTIVES:
            raise DitpipeError(f"--objective must be one of {', '.join(OBJECTIVES)}; got {o!r}")
    if not (archs and sizes and objectives):
        raise DitpipeError("compare needs at least one --arch, one --size and one --objective")
    short = {"rectified_flow": "rf", "ddpm": "ddpm"}
    return [Experiment(f"{prefix}-{a}-{s.replace('/', '-')}-{short[o]}".lower(), a, s, o)
            for a in archs for s in sizes for o in objectives]


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def experiments_of(show: list[dict]) -> dict[str, dict]:
    """``dvc exp show --json`` to {experiment name: {"rev", "params", "metrics"}} (newest first wins)."""
    out: dict[str, dict] = {}
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                name, data = rev.get("name"), rev.get("data") or {}
                if not name or name in out:
                    continue
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                metrics = {}
                for path, m in (data.get("metrics") or {}).items():
                    if "data" in m:
                        metrics[path] = m["data"]
                out[name] = {"rev": rev.get("rev"), "params": params, "metrics": metrics}
    return out


def row(exp: Experiment, found: dict | None) -> dict:
    """One table row; a missing experiment or metric is None (the table says so, nothing is made up)."""
    r: dict = {"experiment": exp.name, "arch": exp.arch, "size": exp.size, "objective": exp.objective}
    metrics = {}
    if found is not None:
        metrics = found["metrics"].get(_get(found["params"], "paths.metrics") or "", {})
    train = metrics.get("train") or {}
    acc = metrics.get("accuracy") or {}
    r.update({
        "ok": bool(metrics), "step": metrics.get("step"), "params_m": (train.get("parameters") or 0) / 1e6 or None,
        "gflops": train.get("gflops_per_image"), "train_flops": train.get("train_flops"),
        "train_seconds": train.get("train_seconds"), "images_per_s": train.get("images_per_s"),
        "n": metrics.get("n"), "fid": metrics.get("fid"), "kid": metrics.get("kid"),
        **{k: acc.get(k) for k in ("color", "shape", "relation", "count")},
        "rev": found["rev"] if found else None,
    })
    return r


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    """The table as GitHub markdown; accuracies as percentages; '-' where nothing was measured."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        pct = [_fmt(None if r[k] is None else 100 * r[k], ".0f") + ("%" if r[k] is not None else "")
               for k in ("color", "shape", "relation", "count")]
        cells = [r["experiment"] + ("" if r["ok"] else " (failed)"), r["arch"], r["size"], r["objective"],
                 _fmt(r["params_m"], ".2f"), _fmt(r["gflops"], ".3f"), _fmt(r["train_seconds"], ".0f"),
                 _fmt(r["images_per_s"], ".0f"), _fmt(r["n"], "d"), _fmt(r["fid"], ".1f"),
                 _fmt(r["kid"], ".3f"), *pct]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the shell: dvc, files, a plot


def dvc_exe() -> str:
    """The dvc of this environment (beside its python), even when it is not on PATH."""
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else "dvc"


def _dvc(args: list[str], cwd: Path, env: dict, capture: bool = False) -> str:
    cmd = [dvc_exe(), *args]
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, text=True, check=True,
                              stdout=subprocess.PIPE if capture else None)
    except FileNotFoundError:
        raise DitpipeError("compare needs the `dvc` command (pip install dvc)") from None
    except subprocess.CalledProcessError as exc:
        raise DitpipeError(f"`{' '.join(cmd[1:])}` failed with exit status {exc.returncode}") from None
    return done.stdout or ""


def lock_note(repo: Path) -> None:
    """Say so when git does not track dvc.lock: a queued experiment is built from git (its commit and the tracked
    files' changes), so without the lock it finds no stage run and runs every one again, encoding anew."""
    done = subprocess.run(["git", "status", "--porcelain", "--", "dvc.lock"], cwd=repo, text=True,
                          capture_output=True)
    if done.returncode == 0 and done.stdout.startswith("??"):
        print("compare: git does not track dvc.lock, so DVC's queued experiments cannot see which stages have "
              "run: each experiment runs every stage again (latents and text encoded anew). `git add dvc.lock` "
              "first to reuse them.", file=sys.stderr, flush=True)


def forget_tasks(names: list[str], cwd: Path, env: dict) -> None:
    """Remove the queue tasks of these names (finished or still queued) left by an earlier compare: `dvc queue
    logs NAME` would show the first one's log instead of the new run's."""
    for _ in range(100):  # one task of each name per call
        status = _dvc(["queue", "status"], cwd, env, capture=True)
        stale = sorted({w[1] for w in (line.split() for line in status.splitlines()) if len(w) > 1 and w[1] in names})
        if not stale:
            return
        _dvc(["queue", "remove", *stale], cwd, env, capture=True)


def follow(name: str, cwd: Path, env: dict, poll: float = 2.0) -> None:
    """Stream an experiment's log (``dvc queue logs -f``) once a queue worker has started it.

    Between leaving the queue and running, DVC answers "not started" or "not a valid queued experiment":
    ask again until it streams, or until the experiment has finished without a log to show.
    """
    while True:
        done = subprocess.run([dvc_exe(), "queue", "logs", "-f", name], cwd=cwd, env=env, text=True,
                              stderr=subprocess.PIPE)
        states = _states(cwd, env) if done.returncode else {}
        if done.returncode == 0 or (states is not None and states.get(name) not in ("queued", "running")):
            sys.stderr.write(done.stderr)
            return
        time.sleep(poll)


def _show(cwd: Path, env: dict) -> list[dict] | None:
    """``dvc exp show --json``, or None when DVC cannot answer right now (it fails while a queue worker is
    setting up an experiment's temporary copy)."""
    done = subprocess.run([dvc_exe(), "exp", "show", "--json"], cwd=cwd, env=env, text=True, capture_output=True)
    return None if done.returncode else json.loads(done.stdout or "[]")


def show_experiments(cwd: Path, env: dict, tries: int = 10, poll: float = 2.0) -> list[dict]:
    """``dvc exp show --json``, asked again while DVC is busy; a clear error if it never answers."""
    for _ in range(tries):
        show = _show(cwd, env)
        if show is not None:
            return show
        time.sleep(poll)
    return json.loads(_dvc(["exp", "show", "--json"], cwd, env, capture=True) or "[]")  # DVC's error if it fails


def _states(cwd: Path, env: dict) -> dict[str, str | None] | None:
    """{experiment name: its executor state (queued, running, success, failed)}, or None while DVC is busy."""
    show = _show(cwd, env)
    if show is None:
        return None
    return {e.get("name"): (e.get("executor") or {}).get("state") for b in show for e in b.get("experiments") or []}


def wait_done(names: list[str], cwd: Path, env: dict, poll: float = 2.0, timeout: float = 600.0) -> None:
    """Wait until DVC has collected every experiment's result (its task left the queue)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = _states(cwd, env)
        if states is not None and all(states.get(n) not in ("queued", "running") for n in names):
            return
        time.sleep(poll)
    raise DitpipeError(f"experiments {names} still queued or running after {timeout:.0f}s: see `dvc queue status`")


def curves(rev: str | None, plots_dir: str, cwd: Path) -> list[dict]:
    """The in-run evaluation rows (judged accuracy vs training FLOPs) committed with an experiment."""
    if not rev:
        return []
    done = subprocess.run(["git", "show", f"{rev}:{plots_dir.rstrip('/')}/val.json"], cwd=cwd, text=True,
                          capture_output=True)
    return json.loads(done.stdout) if done.returncode == 0 else []


def plot(path: Path, rows: list[dict], series: dict[str, list[dict]]) -> None:
    """Judged accuracy (in-run, then the final evaluation) against training FLOPs, one line per experiment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        pts = series.get(r["experiment"]) or []
        for ax, key in zip(axes, ("color", "shape"), strict=True):
            xs = [p["flops"] for p in pts if p.get(f"acc_{key}") is not None]
            ys = [p[f"acc_{key}"] for p in pts if p.get(f"acc_{key}") is not None]
            line = ax.plot(xs, ys, marker=".", alpha=0.7, label=f"{r['arch']} {r['size']} {r['objective']}")[0]
            if r[key] is not None and r["train_flops"]:
                ax.scatter([r["train_flops"]], [r[key]], color=line.get_color(), marker="*", s=120, zorder=3)
    for ax, key in zip(axes, ("colour", "shape"), strict=True):
        ax.set(xscale="log", xlabel="training FLOPs", ylabel=f"judged right: {key}", ylim=(0, 1.02),
               title=f"{key} vs training compute (dots: in-run, stars: evaluate)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(experiments: list[Experiment], overrides: list[str], out_dir: str | Path, repo: str | Path = ".",
        jobs: int = 1, execute: bool = True, tracking_uri: str | None = None) -> list[dict]:
    """Queue the experiments, run the queue, and write ``compare.md``, ``compare.json`` and ``compare.png``.

    ``execute=False`` only reads back experiments that already ran (to redraw the table). ``tracking_uri``
    is exported as MLFLOW_TRACKING_URI so runs in DVC's temporary copies log to the workspace's MLflow.
    """
    repo, out_dir = Path(repo).resolve(), Path(out_dir)
    if not (repo / "dvc.yaml").exists():
        raise DitpipeError(f"{repo} has no dvc.yaml: run compare in the ditpipe repository")
    env = dict(os.environ)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if execute:
        lock_note(repo)
        existing = experiments_of(show_experiments(repo, env))
        stale = [e.name for e in experiments if e.name in existing]
        if stale:
            _dvc(["exp", "remove", *stale], repo, env)
        forget_tasks([e.name for e in experiments], repo, env)
        for e in experiments:
            sets = [a for o in [*overrides, *e.overrides()] for a in ("-S", o)]
            _dvc(["exp", "run", "--queue", "-n", e.name, *sets], repo, env)
        _dvc(["queue", "start", "-j", str(jobs)], repo, env)
        for e in experiments:
            follow(e.name, repo, env)
        wait_done([e.name for e in experiments], repo, env)
    found = experiments_of(show_experiments(repo, env))
    rows = [row(e, found.get(e.name)) for e in experiments]
    series = {r["experiment"]: curves(r["rev"], _get(found.get(r["experiment"], {}).get("params", {}),
                                                      "paths.plots") or "artifacts/plots", repo)
              for r in rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(markdown(rows))
    (out_dir / "compare.json").write_text(json.dumps({"overrides": overrides, "rows": rows, "curves": series},
                                                     indent=2))
    plot(out_dir / "compare.png", rows, series)
    return rows
