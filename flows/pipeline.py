"""Prefect wiring only: one task per stage, each driving DVC, so ``dvc.lock`` is the one record.

A stage task runs ``dvc repro --single-item STAGE`` in the repo. DVC runs ``ditpipe STAGE`` (the same
``run`` as the CLI) only when the stage's code, params or inputs changed, restores it from its
run-cache when it has seen them before, and writes ``dvc.lock`` either way. So a Prefect run and
``dvc repro`` agree in both directions by construction: after either, the other has nothing to do.

Overrides (``--param overrides='["train.steps=2000"]'``, the dotted form used everywhere) are checked,
written into ``params.yaml`` by DVC's own ``-S`` code (as ``dvc exp run -S`` does), and the finished
run is saved as a DVC experiment named ``prefect-<flow run name>`` (``dvc exp save``): ``dvc exp show``
lists it, ``dvc exp apply`` brings it back, and its MLflow runs carry the same name. Each stage's
result (ran / restored / up to date, and its one-line summary) is a Prefect artifact of its task run.

Locally: ``python -m flows.pipeline [--set KEY=VALUE] [--stage NAME]``. Deployments: ``prefect.yaml``
(process work pool) or ``python -m flows.serve``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from ditpipe.compare import dvc_exe
from ditpipe.config import load_config
from ditpipe.errors import DitpipeError
from ditpipe.stages import ORDER

UP_TO_DATE, RESTORED, RAN = "up to date", "restored from DVC's run-cache", "ran"


class StageFailed(RuntimeError):
    """A stage failed for a reason worth one retry (I/O, memory), not a user's mistake."""


def _retry_unless_user_error(task, task_run, state) -> bool:
    """A bad param or dataset fails the same way twice: retry only unexpected errors (I/O, OOM)."""
    try:
        state.result()
    except DitpipeError:
        return False
    except Exception:
        return True
    return False


def dvc(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``dvc ARGS`` in ``root`` with this environment's DVC, and its ``ditpipe`` first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    full_env = {**os.environ, **(env or {}), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([dvc_exe(), *args], cwd=root, env=full_env, capture_output=True, text=True)


def stage_outcome(name: str, output: str) -> str:
    """What DVC did with stage ``name``, from its own report."""
    if f"Running stage '{name}'" in output:
        return RAN
    if f"Stage '{name}' is cached" in output:
        return RESTORED
    return UP_TO_DATE


def failure(name: str, output: str) -> Exception:
    """ditpipe's own one-line error (a user's mistake, not retried), else the tail of DVC's output."""
    for line in output.splitlines():
        if line.startswith(f"ditpipe {name}: error:"):
            return DitpipeError(line.split(": error: ", 1)[1])
    tail = "\n".join(output.strip().splitlines()[-15:])
    return StageFailed(f"dvc repro {name} failed:\n{tail}")


def _stage_task(name: str) -> Callable:
    @task(name=name, retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
    def stage(root: str, env: dict[str, str]) -> dict:
        t0 = time.perf_counter()
        proc = dvc(Path(root), "repro", "--single-item", name, env=env)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise failure(name, output)
        outcome = stage_outcome(name, output)
        summary = next((line for line in reversed(proc.stdout.splitlines()) if line.startswith(f"{name}: ")), "")
        result = {"stage": name, "outcome": outcome, "summary": summary,
                  "seconds": round(time.perf_counter() - t0, 1)}
        get_run_logger().info("%s: %s%s", name, outcome, f" | {summary}" if summary else "")
        create_markdown_artifact(
            key=f"stage-{name}", description=f"ditpipe stage {name}",
            markdown=(f"### {name}: {outcome}\n\n| stage | outcome | seconds | summary |\n| --- | --- | --- | --- |\n"
                      f"| {name} | {outcome} | {result['seconds']} | {summary.replace('|', '/') or '-'} |\n"
                      + (sample_grid(Path(root)) if name == "evaluate" else "")))
        return result

    return stage


def sample_grid(root: Path, limit: int = 2_000_000) -> str:
    """The evaluate stage's sample grid as an inline markdown image (the Prefect UI renders data URLs)."""
    import base64

    grid = Path(root) / load_config(Path(root) / "params.yaml").paths.evaluate / "grid.png"
    if not grid.is_file() or grid.stat().st_size > limit:
        return ""
    data = base64.b64encode(grid.read_bytes()).decode()
    return f"\n**Samples** (val prompts, evaluated protocol):\n\n![sample grid](data:image/png;base64,{data})\n"


STAGE_TASKS = {name: _stage_task(name) for name in ORDER}


@task(name="params")
def apply_overrides(root: str, overrides: list[str]) -> None:
    """Write the overrides into params.yaml with DVC's ``-S`` machinery (what ``dvc exp run -S`` does), and check
    that DVC wrote what ditpipe reads from them (its override grammar is Hydra's, ours YAML's)."""
    from dvc.utils.hydra import apply_overrides as dvc_apply

    from ditpipe.config import to_dict

    path = Path(root) / "params.yaml"
    before = path.read_bytes()
    expected = to_dict(load_config(path, overrides))
    try:
        dvc_apply(path, overrides)
        written = to_dict(load_config(path))
    except Exception as exc:
        path.write_bytes(before)
        raise DitpipeError(f"DVC could not apply the overrides {overrides}: {exc}") from None
    if written != expected:
        path.write_bytes(before)
        differ = sorted(f"{section}.{key}" for section in expected for key in expected[section]
                        if expected[section][key] != written.get(section, {}).get(key))
        raise DitpipeError(f"DVC reads {', '.join(differ)} differently from ditpipe in {overrides}: "
                           "quote the value (key='value')")


@task(name="experiment")
def save_experiment(root: str, name: str) -> str:
    """Record the workspace (params, dvc.lock, metrics) as the DVC experiment ``name``."""
    proc = dvc(Path(root), "exp", "save", "--force", "--name", name)
    if proc.returncode != 0:
        raise StageFailed(f"dvc exp save failed:\n{proc.stdout}{proc.stderr}")
    get_run_logger().info("recorded as DVC experiment %s (dvc exp show; dvc exp apply %s)", name, name)
    return name


def experiment_name(given: str) -> str:
    return given or f"prefect-{flow_run.name or 'local'}"


def tag_flow_run(name: str) -> None:
    """Put the DVC experiment's name on this flow run, so the Prefect UI shows which experiment it made."""
    from prefect.client.orchestration import get_client

    if flow_run.id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=[*flow_run.tags, f"dvc-exp:{name}"])


@flow(name="dit-pipeline")
def dit_pipeline(overrides: list[str] | None = None, stages: list[str] | None = None, experiment: str = "",
                 root: str = ".") -> dict:
    """Bring ``stages`` (default: all) up to date through DVC, with dotted ``overrides`` of params.yaml.

    With overrides (or an ``experiment`` name) the result is saved as a DVC experiment.
    """
    repo = Path(root).resolve()
    overrides = list(overrides or [])
    load_config(repo / "params.yaml", overrides)  # every key checked before anything is touched
    unknown = [s for s in stages or [] if s not in STAGE_TASKS]
    if unknown:
        raise DitpipeError(f"unknown stage {unknown[0]!r} (known: {', '.join(ORDER)})")
    record = bool(overrides or experiment)
    name = experiment_name(experiment) if record else ""
    # One MLflow pipeline run per flow run: every stage's child run goes under it.
    env = {"DITPIPE_FLOW_RUN_ID": str(flow_run.id or ""), "DITPIPE_FLOW_RUN_NAME": str(flow_run.name or ""),
           **({"DVC_EXP_NAME": name} if name else {})}
    if record:
        tag_flow_run(name)
    if overrides:
        apply_overrides(str(repo), overrides)
    wanted = set(stages or ORDER)
    results = {n: STAGE_TASKS[n](str(repo), env) for n in ORDER if n in wanted}
    if record:
        save_experiment(str(repo), name)
    by = {o: [n for n, r in results.items() if r["outcome"] == o] for o in (RAN, RESTORED, UP_TO_DATE)}
    get_run_logger().info("stages %s", "; ".join(f"{o}: {', '.join(ns)}" for o, ns in by.items() if ns))
    return {"stages": results, "experiment": name}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the ditpipe pipeline as a local Prefect flow run (through DVC).")
    p.add_argument("--root", default=".", help="the ditpipe repo (default: the current folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param (written to params.yaml; the run is saved as a DVC experiment)")
    p.add_argument("--stage", dest="stages", action="append", choices=ORDER, help="run only these stages")
    p.add_argument("--experiment", default="", help="DVC experiment name (default: prefect-<flow run name>)")
    args = p.parse_args(argv)
    try:
        dit_pipeline(args.overrides, args.stages, args.experiment, args.root)
    except DitpipeError as exc:
        sys.exit(f"flows.pipeline: error: {exc}")


if __name__ == "__main__":
    main()
