"""Prefect wiring only: one task per stage, each calling the same ``run`` as the CLI and DVC.

Run it locally with ``python -m flows.pipeline``, or serve it as the deployment
``dit-pipeline/default`` (``python -m flows.serve``) and trigger it with
``prefect deployment run 'dit-pipeline/default' --param overrides='["data.count=200"]'``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from prefect import flow, get_run_logger, task

from ditpipe.config import load_config
from ditpipe.errors import DitpipeError
from ditpipe.stages import ORDER, run_stage, summary_line


def _retry_unless_user_error(task, task_run, state) -> bool:
    """A bad param or dataset fails the same way twice: retry only unexpected errors (I/O, OOM)."""
    try:
        state.result()
    except DitpipeError:
        return False
    except Exception:
        return True
    return False


def _stage_task(name: str) -> Callable:
    @task(name=name, retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
    def stage(params: str, overrides: list[str]) -> dict:
        summary = run_stage(name, load_config(params, overrides))
        get_run_logger().info(summary_line(name, summary))
        return summary

    return stage


STAGE_TASKS = {name: _stage_task(name) for name in ORDER}


@flow(name="dit-pipeline")
def dit_pipeline(params: str = "params.yaml", overrides: list[str] | None = None,
                 stages: list[str] | None = None) -> dict:
    """Run ``stages`` (default: all, in order) with ``params`` plus dotted ``overrides``."""
    overrides = list(overrides or [])
    load_config(params, overrides)  # every key checked before any stage starts
    unknown = [s for s in stages or [] if s not in STAGE_TASKS]
    if unknown:
        raise DitpipeError(f"unknown stage {unknown[0]!r} (known: {', '.join(ORDER)})")
    wanted = set(stages or ORDER)
    return {name: STAGE_TASKS[name](params, overrides) for name in ORDER if name in wanted}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the ditpipe pipeline as a local Prefect flow run.")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--stage", dest="stages", action="append", choices=ORDER, help="run only these stages")
    args = p.parse_args(argv)
    dit_pipeline(args.params, args.overrides, args.stages)


if __name__ == "__main__":
    main()
