"""MLflow sees the whole pipeline: one parent run per execution, a child per stage with its figures."""

import pytest
from mlflow.tracking import MlflowClient

from ditpipe.tracking import execution, metric_name, numbers
from tests.conftest import mlflow_server


def test_stages_of_one_execution_are_children_of_one_pipeline_run(tmp_path, cli):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"DITPIPE_EXECUTION": "my-pipeline-1", "MLFLOW_TRACKING_URI": uri}
    assert cli("prepare", "--set", "data.count=20", cwd=tmp_path, env=env).returncode == 0
    assert cli("prepare", "--set", "data.count=24", cwd=tmp_path, env=env).returncode == 0
    assert cli("prepare", "--set", f"data.source={tmp_path / 'nowhere'}", cwd=tmp_path, env=env).returncode == 2
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
    cli("prepare", "--set", "data.count=20", cwd=tmp_path, env={**env, "DITPIPE_EXECUTION": "my-pipeline-2"})
    assert len(client.search_runs([exp_id], "tags.`ditpipe.stage` = 'pipeline'")) == 2


def test_a_command_alone_is_its_own_execution():
    exec_id, name = execution()
    assert exec_id.startswith(("ditpipe:", "dvc:")) and name


def test_summary_figures_become_metric_names_mlflow_accepts():
    got = numbers({"accepted": 3, "reasons": {"cannot decode: 'x.png' (truncated)": 2}, "out": "a/b", "ok": True})
    assert got == {"accepted": 3.0, "reasons.cannot decode_ _x.png_ _truncated_": 2.0}
    assert metric_name("a/b.c-d e") == "a/b.c-d e"


def _rest(uri: str, path: str, body: dict | None = None) -> dict:
    """What the MLflow UI asks its server for, over the same REST API."""
    import json
    import urllib.parse
    import urllib.request

    if body is None:
        return json.load(urllib.request.urlopen(f"{uri}/api/2.0/mlflow/{path}", timeout=30))
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=30))


@pytest.mark.slow
def test_two_model_sizes_compare_side_by_side_on_a_real_mlflow_server(tiny_shards, tmp_path):
    """The compare view of two runs that differ in model size: their params, final metrics and loss curves."""
    from ditpipe.config import ModelConfig, TrackingConfig, TrainConfig, load_config, to_dict
    from ditpipe.train import run

    with mlflow_server(tmp_path) as uri:
        track = TrackingConfig(uri=uri, experiment="sizes")
        for size in ("T/2", "T/4"):
            cfg = TrainConfig(steps=4, batch_size=4, log_every=2, eval_every=0)
            resolved = to_dict(load_config(None, ["model.arch=dit", f"model.size={size}", "train.steps=4"]))
            resolved["train"] = to_dict(cfg)
            run(ModelConfig(arch="dit", size=size), cfg, track, tiny_shards / "shards",
                tmp_path / size.replace("/", "_"), resolved)
        exp = _rest(uri, "experiments/get-by-name?experiment_name=sizes")["experiment"]
        runs = _rest(uri, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        by_size = {}
        for r in runs:
            params = {p["key"]: p["value"] for p in r["data"]["params"]}
            by_size[params["model.size"]] = (r, params, {m["key"]: m["value"] for m in r["data"]["metrics"]})
        assert sorted(by_size) == ["T/2", "T/4"]
        (_, p2, m2), (_, p4, m4) = by_size["T/2"], by_size["T/4"]
        differ = {k for k in p2 if p2[k] != p4.get(k)}
        assert differ == {"model.size"}  # the compare view's "show diff only" leaves exactly the model size
        for metrics in (m2, m4):
            assert {"loss", "lr", "images_per_s", "train_flops"} <= set(metrics)
        assert m2["train_flops"] != m4["train_flops"]  # another size, another cost
        for r, _, _ in by_size.values():
            history = _rest(uri, f"metrics/get-history?run_id={r['info']['run_id']}&metric_key=loss")["metrics"]
            assert sorted(m["step"] for m in history) == [2, 4]  # the loss curve, point by point
