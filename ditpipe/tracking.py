"""MLflow tracking for training runs, through ``MlflowClient`` (explicit run ids, no global state).

A run's page tells what was trained on what: the resolved config as params; the git commit, the
shards' index hash and the DVC-locked hashes of every data stage as tags; loss, learning rate, grad
norm, images/s, MFU and memory as metrics; the final EMA model as artifacts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import yaml

from ditpipe.config import TrackingConfig

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

    def finish(self, final_dir: Path | None) -> None:
        pass


class MlflowTracker:
    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_metrics(self, row: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in row.items() if k != "step" and v is not None]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, final_dir: Path | None) -> None:
        if final_dir is not None:
            self.client.log_artifacts(self.run_id, str(final_dir), "model")
        self.client.set_terminated(self.run_id, "FINISHED")


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
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        # SQLite clients put artifacts in a relative ./mlruns unless told otherwise: make it absolute.
        location = (Path.cwd() / "mlruns").resolve().as_uri() if uri.startswith("sqlite") else None
        exp_id = client.create_experiment(cfg.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    tags = {"ditpipe.shards_index_sha256": index_hash, "ditpipe.run_dir": str(run_dir.resolve()),
            **dvc_lock_tags()}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = client.create_run(exp_id, run_name=cfg.run_name or default_name, tags=tags)
    params = [Param(k, v[:6000]) for k, v in flatten(resolved).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return MlflowTracker(client, run.info.run_id)
