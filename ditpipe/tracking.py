"""MLflow tracking for training runs, through ``MlflowClient`` (explicit run ids, no global state).

A run's page tells what was trained on what: the resolved config as params; the git commit, the
shards' index hash and the DVC-locked hashes of every data stage as tags; loss, learning rate, grad
norm, images/s, MFU and memory as metrics; the final EMA model as artifacts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from PIL import Image

from ditpipe.config import TrackingConfig
from ditpipe.errors import DitpipeError

log = logging.getLogger(__name__)
DATA_STAGES = ("prepare", "vae", "latents", "text", "shards")


def tracking_uri(cfg: TrackingConfig) -> str:
    """``tracking.uri``, else $MLFLOW_TRACKING_URI, else an absolute SQLite file in the working directory."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)
    return out


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


def dvc_lock_tags(path: Path = Path("dvc.lock")) -> dict[str, str]:
    """``dvc.<stage>.md5``: the hash DVC locked for each data stage's output."""
    if not path.exists():
        return {}
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    tags = {}
    for name in DATA_STAGES:
        for out in stages.get(name, {}).get("outs", []):
            tags[f"dvc.{name}.md5"] = str(out.get("md5"))
    return tags


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
          is_main: bool, default_name: str) -> NullTracker | MlflowTracker:
    """Open (or, resuming, reopen) the MLflow run of ``run_dir``; a no-op tracker off the main process."""
    if not cfg.enabled or not is_main:
        return NullTracker()
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    if run_id:
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return MlflowTracker(client, run_id)
        except MlflowException:
            log.warning("MLflow run %s not found at %s; starting a new one", run_id, uri)
    exp_id = experiment_id(client, cfg.experiment, uri)
    tags = {"ditpipe.shards_index_sha256": index_hash, "ditpipe.run_dir": str(run_dir.resolve()),
            **dvc_lock_tags(), **origin_tags()}
    run = client.create_run(exp_id, run_name=cfg.run_name or default_name, tags=tags)
    params = [Param(k, v[:6000]) for k, v in flatten(resolved).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return MlflowTracker(client, run.info.run_id)


def log_evaluation(cfg: TrackingConfig, train_run_id: str | None, step: int, metrics: dict[str, float | None],
                   protocol: dict, images: dict[str, Image.Image], artifacts: dict[str, Path]) -> str | None:
    """Log an evaluation: headline metrics and grids on the training run (so the compare view shows them side
    by side), and everything (protocol as params, metrics, grids, files) on a child run of it.

    Returns the child run's id, or None when tracking is off.
    """
    if not cfg.enabled:
        return None
    from mlflow.entities import Metric, Param, RunTag
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
    tags = {**({"mlflow.parentRunId": train_run_id} if parent is not None else {}), **origin_tags()}
    child = client.create_run(exp_id, run_name=f"evaluate-step-{step}", tags=tags).info.run_id
    params = [Param(k, v[:6000]) for k, v in flatten(protocol).items()]
    for i in range(0, len(params), 100):
        client.log_batch(child, params=params[i : i + 100])
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
