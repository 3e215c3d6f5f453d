"""The Prefect path, for real: a Prefect server, the served deployment, `prefect deployment run`, and
an MLflow tracking server receiving the training run."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_e2e import check_shards, repo  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def prefect_env(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    mlflow_port = free_port()
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{mlflow_port}"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    mlflow = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                               str(mlflow_port), "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "--artifacts-destination", str(tmp_path / "mlartifacts"), "--workers", "1"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).status == 200,
                 120, "prefect server", server)
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=2).status == 200,
                 120, "mlflow server", mlflow)
        yield env
    finally:
        for proc in (server, mlflow):
            proc.terminate()
            proc.wait(30)
        log.close()


def test_deployment_run_through_server_and_served_flow(repo, prefect_env):  # noqa: F811
    serve_log = open(repo / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "flows.serve"], cwd=repo, env=prefect_env, stdout=serve_log,
                             stderr=subprocess.STDOUT)
    try:
        def deployed() -> bool:
            return subprocess.run([sys.executable, "-m", "prefect", "deployment", "inspect", "dit-pipeline/default"],
                                  env=prefect_env, capture_output=True).returncode == 0

        wait_for(deployed, 120, "the served deployment", serve)
        proc = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "dit-pipeline/default", "--watch",
             "--watch-timeout", "600", "--param",
             'overrides=["data.count=32", "train.steps=4", "train.batch_size=8", "tracking.experiment=prefect"]'],
            env=prefect_env, capture_output=True, text=True, timeout=700)
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{(repo / 'serve.log').read_text()}"
        assert "Completed" in proc.stdout
        check_shards(repo, 32)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=prefect_env["MLFLOW_TRACKING_URI"])
        exp_id = client.get_experiment_by_name("prefect").experiment_id
        (run,) = client.search_runs([exp_id], "tags.mlflow.parentRunId IS NULL")
        assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "4"
        (evaluation,) = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        assert evaluation.info.status == "FINISHED"  # evaluate logged through the tracking server too
        assert (repo / "artifacts/export/model_index.json").exists()
        assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/config.json"}
    finally:
        serve.terminate()
        serve.wait(30)
        serve_log.close()


def test_bad_override_fails_the_flow_run_before_any_stage(tmp_path, monkeypatch):
    from ditpipe.errors import ConfigError, DitpipeError
    from flows.pipeline import dit_pipeline
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="unknown key data.nope"):
        dit_pipeline.fn(params=str(REPO / "params.yaml"), overrides=["data.nope=1"])
    with pytest.raises(DitpipeError, match="unknown stage 'deploy'"):
        dit_pipeline.fn(params=str(REPO / "params.yaml"), stages=["deploy"])
    assert not (tmp_path / "artifacts").exists()
