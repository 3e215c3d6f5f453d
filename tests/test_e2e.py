"""End to end, as a user runs it: `dvc repro` and `dvc exp run -S` in a fresh copy of the repo."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, committed

pytestmark = pytest.mark.slow

FAST = {"vae": {"block_out_channels": [8, 16, 16], "steps": 20, "batch_size": 16}, "text": {"max_length": 16},
        "shards": {"max_samples": 16}, "model": {"size": "T/2"},
        "train": {"steps": 6, "batch_size": 8, "checkpoint_every": 3, "log_every": 2, "eval_every": 3,
                  "eval_samples": 4, "eval_steps": 2},
        "evaluate": {"steps": 3, "sweep": [1.0, 4.0], "kid_subsets": 10}}
ALL_STAGES = ("prepare", "vae", "latents", "text", "shards", "train", "evaluate", "export")


def sh(cmd: list[str], cwd: Path, timeout: float = 900) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture
def repo(tmp_path) -> Path:
    """The committed files of this repo in a new git repo, with a fast params.yaml."""
    dst = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).exists() and f != "dvc.lock":
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    params = yaml.safe_load(committed("params.yaml"))  # not the user's edits of it
    for section, values in FAST.items():
        params[section].update(values)
    params["data"]["count"] = 48
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dst, check=True)
    return dst


def check_shards(repo: Path, accepted: int) -> dict:
    index = json.loads((repo / "artifacts/shards/index.json").read_text())
    report = json.loads((repo / "artifacts/prepared/report.json").read_text())
    assert report["accepted"] == accepted and report["seen"] == report["accepted"] + report["rejected"]
    total = sum(index["splits"][s]["samples"] for s in ("train", "val"))
    assert total == accepted
    for split in ("train", "val"):
        for shard in index["splits"][split]["shards"]:
            assert (repo / "artifacts/shards" / shard["name"]).stat().st_size == shard["bytes"]
    return index


def test_dvc_repro_shapes_then_exp_run_on_twemoji(repo, twemoji_subset, s3_bucket):
    out = sh(["dvc", "repro"], repo)
    for stage in ALL_STAGES:
        assert f"Running stage '{stage}'" in out
    index = check_shards(repo, 48)
    assert index["data"]["source"] == "builtin:shapes"
    assert "up to date" in sh(["dvc", "repro"], repo)  # nothing changed: nothing runs
    check_mlflow_run(repo, index_sha=hashlib.sha256((repo / "artifacts/shards/index.json").read_bytes()).hexdigest())
    check_evaluation(repo)

    # more steps: the persisted run resumes from its last checkpoint instead of starting over, and is re-evaluated
    out = sh(["dvc", "exp", "run", "-n", "more-steps", "-S", "train.steps=8"], repo)
    assert "Running stage 'train'" in out and "resumed from step 6" in out
    assert "Running stage 'evaluate'" in out and "Running stage 'prepare'" not in out
    check_experiments_compare(repo)
    check_compare_command(repo)

    # real RGBA images from an imagefolder, by override, as a DVC experiment
    out = sh(["dvc", "exp", "run", "-S", f"data.source={twemoji_subset}", "-S", "data.val_fraction=0.2"], repo)
    assert "Running stage 'prepare'" in out
    index = check_shards(repo, 40)
    assert index["data"]["format"] == "imagefolder" and index["splits"]["val"]["samples"] > 0
    # the latents cache was persisted and pruned to the new dataset; the VAE changed, so all re-encoded
    latents = json.loads((repo / "artifacts/latents/index.json").read_text())
    assert latents["samples"] == 40
    # not builtin:shapes: no judge, so the sweep draws only its grid; FID/KID still measured
    metrics = json.loads((repo / "artifacts/metrics.json").read_text())
    assert metrics["accuracy"] is None and metrics["fid"] > 0
    assert any("builtin:shapes prompts only" in n for n in metrics["notes"])
    assert json.loads((repo / "artifacts/plots/guidance.json").read_text()) == []
    assert (repo / "artifacts/evaluate/sweep.png").exists()
    # the shapes run was not deleted by the new data's run: it was moved aside, and DVC brings it back
    assert [p.name for p in (repo / "artifacts").glob("train.dit-T_2-step8-*")]
    sh(["dvc", "exp", "apply", "more-steps"], repo)
    assert json.loads((repo / "artifacts/train/final/ditpipe.json").read_text())["step"] == 8
    assert json.loads((repo / "artifacts/shards/index.json").read_text())["data"]["source"] == "builtin:shapes"
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)
    check_s3_remote(repo, s3_bucket)


def check_s3_remote(repo: Path, bucket: str) -> None:
    """Every stage's outputs go to a DVC S3 remote and come back into an empty workspace cache."""
    sh(["dvc", "remote", "add", "-d", "store", f"{bucket}/dvc-store"], repo)
    sh(["dvc", "remote", "modify", "store", "endpointurl", os.environ["AWS_ENDPOINT_URL"]], repo)
    sh(["dvc", "push"], repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    outs = [o["path"] for stage in lock.values() for o in stage.get("outs", [])]
    cached = [o for o in outs if (repo / o).exists() and o not in ("artifacts/metrics.json", "artifacts/plots")]
    shutil.rmtree(repo / ".dvc" / "cache")
    for o in cached:
        shutil.rmtree(repo / o) if (repo / o).is_dir() else (repo / o).unlink()
    out = sh(["dvc", "pull"], repo)
    assert all((repo / o).exists() for o in cached), out
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)


def check_evaluation(repo: Path) -> None:
    """`dvc repro` ends with samples, grids, metrics DVC reads, plots DVC renders, and a diffusers export."""
    metrics = json.loads(sh(["dvc", "metrics", "show", "--json"], repo))
    values = metrics[""]["data"]["artifacts/metrics.json"]["data"]
    assert values["fid"] > 0 and values["n"] == 3 and values["step"] == 6
    assert set(values["accuracy_real"]) >= {"color", "shape", "relation", "count"}
    for name in ("samples/metadata.jsonl", "grid.png", "sweep.png", "protocol.json"):
        assert (repo / "artifacts/evaluate" / name).exists()
    sh(["dvc", "plots", "show", "-o", "plots-html"], repo)
    html = (repo / "plots-html/index.html").read_text()
    for title in ("training loss", "accuracy vs guidance scale", "samples.png"):
        assert title in html
    assert json.loads((repo / "artifacts/export/model_index.json").read_text())["_class_name"] == "DitpipePipeline"


def check_experiments_compare(repo: Path) -> None:
    """`dvc exp show` lists the workspace and the experiment with their metrics side by side."""
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(sh(["dvc", "exp", "show", "--csv"], repo))))
    fid_col = next(c for c in rows[0] if c.endswith("fid"))
    steps = {r["train.steps"]: r[fid_col] for r in rows if r.get(fid_col)}
    assert {"6", "8"} <= set(steps), rows


def check_compare_command(repo: Path) -> None:
    """`ditpipe compare` queues one DVC experiment per arch, runs them on the cached shards, and tabulates."""
    sh(["git", "add", "dvc.lock"], repo)  # as DVC says after a run: queued experiments see only what git tracks
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "the pipeline's outputs"], repo)
    out = sh(["ditpipe", "compare", "--arch", "dit", "--arch", "unet", "--size", "T/2", "--set", "train.steps=4",
              "--out", "cmp"], repo)
    assert "git does not track dvc.lock" not in out and out.count("Running stage 'train'") == 2
    for stage in ("prepare", "vae", "latents", "text", "shards"):  # the data stages' outputs are reused as they are
        assert f"Running stage '{stage}'" not in out and f"Stage '{stage}' is cached" not in out
    # the workspace's run is the same dit at step 8: each experiment trains its own 4 steps instead of reusing it
    assert "past train.steps=4" in out
    table = (repo / "cmp/compare.md").read_text()
    rows = json.loads((repo / "cmp/compare.json").read_text())["rows"]
    assert [r["experiment"] for r in rows] == ["cmp-dit-t-2-rf", "cmp-unet-t-2-rf"]
    for r in rows:
        assert r["ok"] and r["step"] == 4 and r["fid"] > 0 and r["params_m"] > 0 and r["gflops"] > 0
        assert r["train_seconds"] > 0 and r["images_per_s"] > 0 and 0 <= r["color"] <= 1
        assert f"| {r['experiment']} | {r['arch']} | T/2 |" in table
    assert rows[0]["params_m"] != rows[1]["params_m"]
    assert (repo / "cmp/compare.png").stat().st_size > 10_000
    # the experiments ran in DVC's temporary copies, yet their MLflow runs are in the workspace's database
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ditpipe")
    runs = client.search_runs([exp.experiment_id], "tags.`train.steps` = '4'")
    archs = {r.data.params.get("model.arch") for r in runs}
    assert archs == {"dit", "unet"}
    # each experiment is its own pipeline execution, named after it
    parents = {r.data.params["model.arch"]: client.get_run(r.data.tags["mlflow.parentRunId"]) for r in runs}
    for arch, parent in parents.items():
        assert parent.info.run_name.startswith(f"dvc exp cmp-{arch}-t-2-rf"), parent.info.run_name
    # redrawing the table reads the finished experiments back without running anything
    again = sh(["ditpipe", "compare", "--arch", "dit", "--arch", "unet", "--size", "T/2", "--no-run", "--out", "cmp2"],
               repo)
    assert "Running stage" not in again and (repo / "cmp2/compare.md").read_text() == table


def check_mlflow_run(repo: Path, index_sha: str) -> None:
    """One pipeline run for the `dvc repro`, a child per stage with its figures; the training run's page alone
    tells what was trained on what."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ditpipe")
    (pipeline,) = client.search_runs([exp.experiment_id], "tags.mlflow.parentRunId IS NULL")
    assert pipeline.data.tags["ditpipe.stage"] == "pipeline" and pipeline.info.run_name.startswith("dvc repro")
    assert pipeline.info.status == "FINISHED" and len(pipeline.data.tags["mlflow.source.git.commit"]) == 40
    for stage in ("prepare", "vae", "latents", "text", "shards", "train", "evaluate"):
        assert pipeline.data.tags[f"dvc.{stage}.md5"], stage  # every output DVC locked in this execution
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{pipeline.info.run_id}'")
    stages = {c.data.tags["ditpipe.stage"]: c for c in children}
    assert sorted(stages) == sorted(ALL_STAGES) and all(c.info.status == "FINISHED" for c in children)
    assert stages["prepare"].data.metrics["accepted"] == 48 and stages["prepare"].data.params["data.count"] == "48"
    assert stages["vae"].data.metrics["psnr_db"] > 0
    assert stages["shards"].data.metrics["splits.train.samples"] > 0

    run = stages["train"]
    assert run.data.params["model.size"] == "T/2" and run.data.params["data.source"] == "builtin:shapes"
    assert run.data.tags["train.steps"] == "6"
    assert run.data.tags["ditpipe.shards_index_sha256"] == index_sha
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    for stage in ("prepare", "vae", "latents", "text", "shards"):
        assert run.data.tags[f"dvc.{stage}.md5"].endswith(".dir")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
    assert "eval/fid" in run.data.metrics and "val_loss" in run.data.metrics  # evaluation shows on the run
    evaluation = stages["evaluate"]
    assert evaluation.data.params["sampler"] == "euler" and "eval/kid" in evaluation.data.metrics
    assert evaluation.data.tags["ditpipe.train_run_id"] == run.info.run_id
