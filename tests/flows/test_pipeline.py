"""The Prefect path, for real: `flows.local up` (server, process work pool, worker, prefect.yaml deployment),
`prefect deployment run`, DVC agreeing with what the flow did, and an MLflow tracking server."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ditpipe.stages import ORDER
from tests.conftest import free_port, mlflow_server
from tests.test_e2e import check_shards, repo  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


@pytest.fixture
def prefect_env(tmp_path):
    """A Prefect home of its own and an MLflow tracking server, both on 127.0.0.1."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with mlflow_server(tmp_path, env) as uri:
        yield {**env, "MLFLOW_TRACKING_URI": uri}


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 700) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-6000:]}" for p in sorted((cwd / ".prefect-local").glob("*.log")))
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}{logs}"
    return proc.stdout + proc.stderr


def deployment_run(cwd: Path, env: dict, overrides: list[str]) -> str:
    """``prefect deployment run`` as the README says; returns the flow's closing line from the worker log."""
    log = cwd / ".prefect-local/worker.log"
    before = log.read_text().count(" - stages ")
    out = run([sys.executable, "-m", "prefect", "deployment", "run", "dit-pipeline/default", "--watch",
               "--watch-timeout", "600", "--param", f"overrides={json.dumps(overrides)}"], cwd, env)
    assert "Completed" in out
    lines = [line for line in log.read_text().splitlines() if " - stages " in line]
    assert len(lines) == before + 1, lines
    return lines[-1].split(" - stages ", 1)[1]


def test_prefect_deployment_and_dvc_are_one_pipeline(repo, prefect_env):  # noqa: F811
    """flows.local up; deployment runs through the worker; DVC agrees; only what changed reruns; down."""
    port = free_port()
    out = run([sys.executable, "-m", "flows.local", "up", "--port", str(port)], repo, prefect_env)
    url = f"http://127.0.0.1:{port}/api"
    assert f"export PREFECT_API_URL={url}" in out
    env = {**prefect_env, "PREFECT_API_URL": url}
    try:
        # Flow runs execute in the folder `up` was run from (here the copy, never the checkout the test runs in).
        inspect = run([sys.executable, "-m", "prefect", "deployment", "inspect", "dit-pipeline/default"], repo, env)
        assert f"'{repo}'" in inspect and "'directory'" in inspect, inspect
        tiny = ["data.count=32", "train.steps=4", "train.batch_size=8", "tracking.experiment=prefect"]
        assert deployment_run(repo, env, tiny) == f"ran: {', '.join(ORDER)}"
        check_shards(repo, 32)
        # DVC agrees: nothing is stale, `dvc repro` has nothing to do, and the run is a DVC experiment.
        assert json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], repo, env)) == {}
        assert "Data and pipelines are up to date" in run([sys.executable, "-m", "dvc", "repro"], repo, env)
        shown = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo, env))
        exps = {r["name"]: r for c in shown for e in c.get("experiments") or [] for r in e["revs"] if r.get("name")}
        (exp_name,) = [n for n in exps if n.startswith("prefect-")]
        assert exps[exp_name]["data"]["params"]["params.yaml"]["data"]["data"]["count"] == 32
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        exp_id = client.get_experiment_by_name("prefect").experiment_id
        # MLflow: one pipeline run for the flow run, one child per stage, all carrying the experiment's name.
        (pipeline,) = client.search_runs([exp_id], "tags.mlflow.parentRunId IS NULL")
        flow_run_id = pipeline.data.tags["prefect.flow_run_id"]
        assert pipeline.data.tags["ditpipe.execution"] == f"prefect:{flow_run_id}"
        assert pipeline.info.status == "FINISHED" and pipeline.data.tags["dvc.experiment"] == exp_name
        stages = children(client, exp_id, pipeline)
        assert sorted(stages) == sorted(ORDER)
        train_run = stages["train"]
        assert train_run.info.status == "FINISHED" and train_run.data.tags["train.steps"] == "4"
        assert train_run.data.tags["dvc.experiment"] == exp_name and train_run.data.tags["prefect.flow_run_id"]
        assert stages["evaluate"].data.tags["ditpipe.train_run_id"] == train_run.info.run_id
        assert stages["prepare"].data.metrics["accepted"] == 32
        # the Prefect UI shows each stage's outcome, and the evaluation's sample grid inline
        art = run([sys.executable, "-m", "prefect", "artifact", "inspect", "stage-evaluate"], repo, env)
        assert "evaluate: ran" in art and "data:image/png;base64," in art
        assert (repo / "artifacts/export/model_index.json").exists()

        # The same params again: no stage works. Only a training param changed: train and what follows rerun.
        assert deployment_run(repo, env, tiny) == f"up to date: {', '.join(ORDER)}"
        assert deployment_run(repo, env, [*tiny[:1], "train.steps=5", *tiny[2:]]) == (
            "ran: train, evaluate, export; up to date: prepare, vae, latents, text, shards")
        # a second pipeline run with only the stages that worked; the resumed training run moved under it and
        # says it ended at 5 steps
        latest = [p for p in client.search_runs([exp_id], "tags.mlflow.parentRunId IS NULL")
                  if p.info.run_id != pipeline.info.run_id]
        assert len(latest) == 1
        again = children(client, exp_id, latest[0])
        assert sorted(again) == ["evaluate", "export", "train"]
        assert again["train"].info.run_id == train_run.info.run_id and again["train"].data.tags["train.steps"] == "5"
        assert json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], repo, env)) == {}
    finally:
        out = run([sys.executable, "-m", "flows.local", "down"], repo, prefect_env)
    assert "stopped: worker, server" in out
    assert not any((repo / ".prefect-local").glob("*.pid"))


def children(client, exp_id: str, parent) -> dict:
    runs = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.data.tags["ditpipe.stage"]: r for r in runs}


def test_bad_override_or_stage_fails_the_flow_before_anything_is_touched(tmp_path):
    from ditpipe.errors import ConfigError, DitpipeError
    from flows.pipeline import dit_pipeline
    from tests.conftest import REPO

    params = (REPO / "params.yaml").read_bytes()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="unknown key data.nope"):
        dit_pipeline.fn(overrides=["data.nope=1"], root=str(tmp_path))
    with pytest.raises(DitpipeError, match="unknown stage 'deploy'"):
        dit_pipeline.fn(stages=["deploy"], root=str(tmp_path))
    assert (tmp_path / "params.yaml").read_bytes() == params
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_stage_outcome_and_failure_read_dvc_and_ditpipe_output():
    from ditpipe.errors import DitpipeError
    from flows.pipeline import RAN, RESTORED, UP_TO_DATE, StageFailed, failure, stage_outcome

    assert stage_outcome("train", "Running stage 'train':\n> ditpipe train\ntrain: ...") == RAN
    assert stage_outcome("vae", "Stage 'vae' is cached - skipping run, checking out outputs") == RESTORED
    assert stage_outcome("vae", "Stage 'vae' didn't change, skipping") == UP_TO_DATE
    err = failure("train", "Running stage 'train':\nditpipe train: error: train.lr must be > 0, got -1\nERROR: ...")
    assert isinstance(err, DitpipeError) and str(err) == "train.lr must be > 0, got -1"
    assert isinstance(failure("train", "Traceback ...\nOSError: disk full"), StageFailed)


def test_overrides_go_into_params_yaml_as_dvc_writes_them_or_not_at_all(tmp_path, monkeypatch):
    import dvc.utils.hydra

    from ditpipe.config import load_config
    from ditpipe.errors import DitpipeError
    from flows.pipeline import apply_overrides
    from tests.conftest import committed

    (tmp_path / "params.yaml").write_bytes(committed("params.yaml"))
    apply_overrides.fn(str(tmp_path), ["train.lr=1e-3", "evaluate.sweep=[1.0, 4.0]", "tracking.uri=http://h:5000"])
    cfg = load_config(tmp_path / "params.yaml")
    assert (cfg.train.lr, cfg.evaluate.sweep, cfg.tracking.uri) == (1e-3, (1.0, 4.0), "http://h:5000")

    before = (tmp_path / "params.yaml").read_bytes()

    def misreads(path, overrides):  # as if DVC's grammar read a value otherwise than ditpipe's
        path.write_text(path.read_text().replace("steps: 1000", "steps: 10"))

    monkeypatch.setattr(dvc.utils.hydra, "apply_overrides", misreads)
    with pytest.raises(DitpipeError, match="DVC reads train.steps differently"):
        apply_overrides.fn(str(tmp_path), ["train.steps=1000"])
    assert (tmp_path / "params.yaml").read_bytes() == before  # left as it was


def test_the_evaluate_artifact_carries_the_sample_grid(tmp_path):
    import base64

    from PIL import Image

    from flows.pipeline import sample_grid
    from tests.conftest import committed

    (tmp_path / "params.yaml").write_bytes(committed("params.yaml"))
    assert sample_grid(tmp_path) == ""  # no evaluation yet: no picture
    (tmp_path / "artifacts/evaluate").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "artifacts/evaluate/grid.png")
    md = sample_grid(tmp_path)
    data = md.split("data:image/png;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(data) == (tmp_path / "artifacts/evaluate/grid.png").read_bytes()
