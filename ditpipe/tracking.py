"""MLflow tracking, through ``MlflowClient`` (explicit run ids, no global state).

Every pipeline execution (a ``dvc repro`` or ``dvc exp run``, a Prefect flow run, a ``ditpipe`` command)
is one parent run; each stage that runs in it is a child run with that stage's figures. The training
run is the ``train`` child: its page tells what was trained on what (the resolved config as params,
the settings a resume may change as tags; the git commit, the shards' index hash and, under DVC, the
locked hashes of the data it read as tags; loss, learning rate, grad norm, images/s, MFU and memory
as metrics; the final EMA model as artifacts).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from PIL import Image

from ditpipe.config import TrackingConfig
from ditpipe.errors import DitpipeError

log = logging.getLogger(__name__)
DATA_STAGES = ("prepare", "vae", "latents", "text", "shards")
PARENT_ENV = "DITPIPE_MLFLOW_PARENT"  # the pipeline run a stage's own runs (train, evaluate) go under
EXECUTION_ENV = "DITPIPE_EXECUTION"  # set to group stage runs yourself; Prefect flows and DVC are found alone


def tracking_uri(cfg: TrackingConfig) -> str:
    """``tracking.uri``, else $MLFLOW_TRACKING_URI, else an absolute SQLite file in the working directory."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def leaves(d: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of every non-dict value of a nested dict."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def flatten(d: dict) -> dict[str, str]:
    return {k: str(v) for k, v in leaves(d)}


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    batch = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(batch), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=batch[i : i + 100])


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def origin_tags() -> dict[str, str]:
    """Where a run came from: the git commit, and the DVC experiment and Prefect flow run that started it."""
    tags = {}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for tag, var in (("dvc.experiment", "DVC_EXP_NAME"), ("prefect.flow_run_id", "DITPIPE_FLOW_RUN_ID")):
        if os.environ.get(var):
            tags[tag] = os.environ[var]
    return tags


def dvc_lock_tags(path: Path = Path("dvc.lock"), stages: tuple[str, ...] = DATA_STAGES) -> dict[str, str]:
    """``dvc.<stage>.md5``: the hash DVC locked for each of ``stages``' outputs.

    Only under DVC (``DVC_STAGE`` set: DVC has just checked or built those outputs for this stage); a
    stage run by hand may read something other than what dvc.lock says, so it gets none.
    """
    if not os.environ.get("DVC_STAGE") or not path.exists():
        return {}
    locked = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    tags = {}
    for name in stages:
        outs = locked.get(name, {}).get("outs", [])
        if outs:  # the first output is the stage's artifact (evaluate's others are caches, metrics, plots)
            tags[f"dvc.{name}.md5"] = str(outs[0].get("md5"))
    return tags


def execution() -> tuple[str, str]:
    """(id, display name) of the pipeline execution this process is a stage of: the Prefect flow run, else the
    nearest ``dvc`` process above this one (one ``dvc repro`` or one experiment), else this command."""
    when = time.strftime("%Y-%m-%d %H:%M")
    if os.environ.get("DITPIPE_FLOW_RUN_ID"):
        flow_run = os.environ["DITPIPE_FLOW_RUN_ID"]
        return f"prefect:{flow_run}", f"prefect {os.environ.get('DITPIPE_FLOW_RUN_NAME') or flow_run[:8]}"
    if os.environ.get(EXECUTION_ENV):
        return os.environ[EXECUTION_ENV], os.environ[EXECUTION_ENV]
    import psutil

    me = psutil.Process()
    for proc in me.parents():
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        words = [os.path.basename(c) for c in cmd[:4]]
        if "dvc" in words:  # `dvc repro`, `.venv/bin/dvc exp run`, `python -m dvc exp exec-run ...`
            sub = cmd[words.index("dvc") + 1 : words.index("dvc") + 2]
            exp = os.environ.get("DVC_EXP_NAME")
            name = f"dvc exp {exp}" if exp else f"dvc {' '.join(sub)}".strip()
            return f"dvc:{proc.pid}:{proc.create_time():.2f}", f"{name} {when}"
    return f"ditpipe:{me.pid}:{me.create_time():.2f}", f"ditpipe {' '.join(sys.argv[1:2])} {when}"


def metric_name(key: str) -> str:
    """MLflow takes letters, digits and ``_-./ `` in metric names (rejection reasons hold anything)."""
    return re.sub(r"[^\w\-./ ]", "_", key)[:250]


def numbers(d: dict) -> dict[str, float]:
    """The numeric leaves of a summary, as dotted metric names."""
    return {metric_name(k): float(v) for k, v in leaves(d) if isinstance(v, int | float) and not isinstance(v, bool)}


class NullTracker:
    run_id: str | None = None

    def log_metrics(self, row: dict, step: int) -> None:
        pass

    def log_image(self, image: Image.Image, key: str, step: int) -> None:
        pass

    def finish(self, final_dir: Path | None) -> None:
        pass

    @contextlib.contextmanager
    def failed_on_error(self) -> Iterator[None]:
        yield


class MlflowTracker:
    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_metrics(self, row: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in row.items() if k != "step" and v is not None]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_image(self, image: Image.Image, key: str, step: int) -> None:
        self.client.log_image(self.run_id, image, key=key, step=step)

    def finish(self, final_dir: Path | None) -> None:
        if final_dir is not None:
            self.client.log_artifacts(self.run_id, str(final_dir), "model")
        self.client.set_terminated(self.run_id, "FINISHED")

    @contextlib.contextmanager
    def failed_on_error(self) -> Iterator[None]:
        """End the run FAILED (KILLED on Ctrl-C) when the block raises; a resume reopens it as RUNNING."""
        try:
            yield
        except BaseException as exc:
            try:
                self.client.set_terminated(self.run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            except Exception:  # the error being raised matters more than the run's status
                log.warning("could not mark MLflow run %s as failed", self.run_id)
            raise


def sqlite_artifacts(uri: str) -> str | None:
    """``mlruns/`` beside the database of a ``sqlite:///`` URI, as a file URI; None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return ((db if db.is_absolute() else Path.cwd() / db).resolve().parent / "mlruns").as_uri()


# MLflow 3's UI opens an experiment without this tag on its GenAI overview; with it, on the run list.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created when missing; marked as model training so the UI opens on its runs."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if not any(exp.tags.get(k) for k in EXPERIMENT_KIND):
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    # SQLite clients put artifacts in a relative ./mlruns unless told otherwise: put them beside the database
    # file, so a run started elsewhere (a DVC experiment's temporary copy of the repo) still lands there.
    location = sqlite_artifacts(uri)
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def check_reachable(cfg: TrackingConfig, timeout: float = 5.0) -> None:
    """Fail at once, naming the URI, when tracking is on and its server does not answer (MLflow's own client
    would retry for minutes and end in a traceback, after the stage's work)."""
    uri = tracking_uri(cfg)
    if not cfg.enabled or not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy or an older server without /health): reachable
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DitpipeError(f"tracking.uri {uri} does not answer ({reason}): start the MLflow server, point "
                           "tracking.uri (or MLFLOW_TRACKING_URI) at a running one, or set tracking.enabled=false"
                           ) from None


def start(cfg: TrackingConfig, run_dir: Path, resolved: dict, index_hash: str, run_id: str | None,
          is_main: bool, default_name: str, mutable: frozenset[str] = frozenset()) -> NullTracker | MlflowTracker:
    """Open (or, resuming, reopen) the MLflow run of ``run_dir``; a no-op tracker off the main process.

    The config is logged as params, except the ``mutable`` keys (those a resume may change, such as
    ``train.steps``): MLflow params cannot change, so those are tags, rewritten on every resume, and the run
    always shows the settings it ended with. A resumed run moves under the current pipeline run.
    """
    if not cfg.enabled or not is_main:
        return NullTracker()
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    flat = flatten(resolved)
    now_tags = {"ditpipe.shards_index_sha256": index_hash, **dvc_lock_tags(), **origin_tags(),
                **{k: v[:5000] for k, v in flat.items() if k in mutable}}
    if os.environ.get(PARENT_ENV):
        now_tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
    if run_id:
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in now_tags.items()])
            return MlflowTracker(client, run_id)
        except MlflowException:
            log.warning("MLflow run %s not found at %s; starting a new one", run_id, uri)
    exp_id = experiment_id(client, cfg.experiment, uri)
    run = client.create_run(exp_id, run_name=cfg.run_name or default_name,
                            tags={"ditpipe.run_dir": str(run_dir.resolve()), "ditpipe.stage": "train", **now_tags})
    log_params(client, run.info.run_id, {k: v for k, v in flat.items() if k not in mutable})
    return MlflowTracker(client, run.info.run_id)


class StageRecord:
    """What :func:`stage_run` yields: the stage sets ``summary`` when it ends well."""

    summary: dict | None = None


@contextlib.contextmanager
def stage_run(cfg: TrackingConfig, stage: str, params: dict, own_run: bool) -> Iterator[StageRecord]:
    """The stage as a child of its execution's pipeline run (found, or made by the first stage that runs).

    Stages with runs of their own (``own_run``: train, evaluate) create them under the pipeline run
    (through ``DITPIPE_MLFLOW_PARENT``); for the others a child run gets the stage's section as params and
    the numeric figures of its summary as metrics. The pipeline run ends FINISHED after each stage that
    does (FAILED when one fails) and carries the DVC-locked hash of every output DVC recorded so far.
    """
    record = StageRecord()
    if not cfg.enabled:
        yield record
        return
    check_reachable(cfg)
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    parent = pipeline_run(client, experiment_id(client, cfg.experiment, uri))
    client.update_run(parent, status="RUNNING")
    started = int(time.time() * 1000)
    before, os.environ[PARENT_ENV] = os.environ.get(PARENT_ENV), parent
    try:
        yield record
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the stage's error matters more than the record of it
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            if not own_run:
                _stage_child(client, parent, stage, params, {}, started, status, error=str(exc)[:5000])
            client.set_terminated(parent, status)
        raise
    finally:
        if before is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = before
    try:
        if not own_run:
            _stage_child(client, parent, stage, params, record.summary or {}, started, "FINISHED")
        from mlflow.entities import RunTag

        client.log_batch(parent, tags=[RunTag(k, v) for k, v in dvc_lock_tags(stages=STAGE_ORDER).items()])
        client.set_terminated(parent, "FINISHED")
    except Exception as exc:  # noqa: BLE001 - the work is done and on disk; a tracking hiccup must not fail it
        log.warning("could not record stage %s in MLflow: %s", stage, exc)


STAGE_ORDER = (*DATA_STAGES, "train", "evaluate", "export")


def pipeline_run(client, exp_id: str) -> str:
    """The parent run of this execution, created by its first stage."""
    exec_id, name = execution()
    found = client.search_runs([exp_id], f"tags.`ditpipe.execution` = '{exec_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"ditpipe.execution": exec_id, "ditpipe.stage": "pipeline", **origin_tags()}
    return client.create_run(exp_id, run_name=name, tags=tags).info.run_id


def _stage_child(client, parent: str, stage: str, params: dict, summary: dict, started: int, status: str,
                 error: str | None = None) -> str:
    from mlflow.entities import Metric

    exp_id = client.get_run(parent).info.experiment_id
    tags = {"mlflow.parentRunId": parent, "ditpipe.stage": stage, **origin_tags(), **dvc_lock_tags(),
            **({"ditpipe.error": error} if error else {})}
    run = client.create_run(exp_id, run_name=stage, start_time=started, tags=tags).info.run_id
    log_params(client, run, flatten(params))
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in numbers(summary).items()]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run, metrics=metrics[i : i + 1000])
    if summary:
        client.set_tag(run, "ditpipe.summary", json.dumps(summary, default=str, sort_keys=True)[:5000])
    client.set_terminated(run, status)
    return run


def log_evaluation(cfg: TrackingConfig, train_run_id: str | None, step: int, metrics: dict[str, float | None],
                   protocol: dict, images: dict[str, Image.Image], artifacts: dict[str, Path]) -> str | None:
    """Log an evaluation: headline metrics and grids on the training run (so the compare view shows them side
    by side), and everything (protocol as params, metrics, grids, files) on a child run of it.

    Returns the child run's id, or None when tracking is off.
    """
    if not cfg.enabled:
        return None
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    values = [(f"eval/{k}", float(v)) for k, v in metrics.items() if v is not None]
    parent = None
    if train_run_id:
        try:
            parent = client.get_run(train_run_id)
        except MlflowException:
            log.warning("training run %s not found at %s; logging the evaluation on its own", train_run_id, uri)
    if parent is not None:
        client.log_batch(train_run_id, metrics=[Metric(k, v, now, step) for k, v in values],
                         tags=[RunTag(f"eval.{k}", str(v)[:5000]) for k, v in flatten(protocol).items()])
        for key, image in images.items():
            client.log_image(train_run_id, image, key=f"eval/{key}", step=step)
        exp_id = parent.info.experiment_id
    else:
        exp_id = experiment_id(client, cfg.experiment, uri)
    # Under the pipeline run when there is one (a stage of an execution), else under the training run.
    under = os.environ.get(PARENT_ENV) or (train_run_id if parent is not None else None)
    tags = {**({"mlflow.parentRunId": under} if under else {}), "ditpipe.stage": "evaluate",
            **({"ditpipe.train_run_id": train_run_id} if train_run_id else {}), **origin_tags(),
            **dvc_lock_tags(stages=(*DATA_STAGES, "train"))}
    child = client.create_run(exp_id, run_name=f"evaluate-step-{step}", tags=tags).info.run_id
    log_params(client, child, flatten(protocol))
    client.log_batch(child, metrics=[Metric(k, v, now, step) for k, v in values])
    for key, image in images.items():
        client.log_image(child, image, key=f"eval/{key}", step=step)
    for name, path in artifacts.items():
        if path.is_dir():
            client.log_artifacts(child, str(path), name)
        elif path.exists():
            client.log_artifact(child, str(path), name)
    client.set_terminated(child, "FINISHED")
    return child
