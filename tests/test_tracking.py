"""MLflow sees the whole pipeline: one parent run per execution, a child per stage with its figures."""

from mlflow.tracking import MlflowClient

from ditpipe.tracking import execution, metric_name, numbers
from tests.conftest import run_cli


def test_stages_of_one_execution_are_children_of_one_pipeline_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"DITPIPE_EXECUTION": "my-pipeline-1", "MLFLOW_TRACKING_URI": uri, "TQDM_DISABLE": "1"}
    run_cli("prepare", "--set", "data.count=20", cwd=tmp_path, env=env)
    run_cli("prepare", "--set", "data.count=24", cwd=tmp_path, env=env)
    bad = run_cli("prepare", "--set", f"data.source={tmp_path / 'nowhere'}", cwd=tmp_path, env=env, check=False)
    assert bad.returncode == 2
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.get_experiment_by_name("ditpipe").experiment_id
    (parent,) = client.search_runs([exp_id], "tags.`ditpipe.stage` = 'pipeline'")
    assert parent.info.run_name == "my-pipeline-1" and parent.data.tags["ditpipe.execution"] == "my-pipeline-1"
    assert parent.info.status == "FAILED"  # its last stage failed
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    assert [c.data.tags["ditpipe.stage"] for c in children] == ["prepare"] * 3
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED", "FAILED"]
    assert [c.data.metrics.get("accepted") for c in children[:2]] == [20.0, 24.0]
    assert children[0].data.params["data.count"] == "20" and children[1].data.params["data.count"] == "24"
    assert "nowhere" in children[2].data.tags["ditpipe.error"]
    # another execution: another pipeline run
    run_cli("prepare", "--set", "data.count=20", cwd=tmp_path, env={**env, "DITPIPE_EXECUTION": "my-pipeline-2"})
    assert len(client.search_runs([exp_id], "tags.`ditpipe.stage` = 'pipeline'")) == 2


def test_a_command_alone_is_its_own_execution():
    exec_id, name = execution()
    assert exec_id.startswith(("ditpipe:", "dvc:")) and name


def test_summary_figures_become_metric_names_mlflow_accepts():
    got = numbers({"accepted": 3, "reasons": {"cannot decode: 'x.png' (truncated)": 2}, "out": "a/b", "ok": True})
    assert got == {"accepted": 3.0, "reasons.cannot decode_ _x.png_ _truncated_": 2.0}
    assert metric_name("a/b.c-d e") == "a/b.c-d e"
