import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ditpipe.config import ModelConfig, TrackingConfig, TrainConfig, load_config, to_dict
from ditpipe.errors import DitpipeError
from ditpipe.io import read_jsonl
from ditpipe.loader import empty_caption, make_loader
from ditpipe.models import build_model, load_denoiser
from ditpipe.train import checkpoints, lr_factor, make_batch, run
from tests.conftest import REPO

NO_TRACKING = TrackingConfig(enabled=False)


def train(tiny_shards, out, arch="cross", objective="rectified_flow", **train_kw):
    model_cfg = ModelConfig(arch=arch, size="T/2")
    cfg = TrainConfig(objective=objective, batch_size=8, log_every=1, warmup_steps=2, **train_kw)
    resolved = to_dict(load_config(None, [f"model.arch={arch}", "model.size=T/2"]))
    resolved["train"] = to_dict(cfg)
    return run(model_cfg, cfg, NO_TRACKING, tiny_shards / "shards", out, resolved)


def test_make_batch_resamples_scales_and_drops_captions(tiny_shards):
    raw = next(iter(make_loader(tiny_shards / "shards", "train", 32)))
    empty = empty_caption(tiny_shards / "shards")
    cfg = TrainConfig(caption_dropout=0.5, flip_prob=0.0)
    a = make_batch(raw, empty, cfg, torch.Generator().manual_seed(1), 2.0, 0.0, torch.device("cpu"))
    b = make_batch(raw, empty, cfg, torch.Generator().manual_seed(1), 2.0, 0.0, torch.device("cpu"))
    torch.testing.assert_close(a.x0, b.x0)  # all randomness comes from the generator
    dropped = (a.pooled == empty["pooled"]).all(1)
    assert 0 < dropped.sum() < 32
    assert (a.mask[dropped] == empty["mask"].long()).all()
    spread = (a.x0 / 2 - raw["mean"]).abs().max()
    assert 0 < spread < 10 * torch.exp(0.5 * raw["logvar"]).max()  # sampled near the mean, then scaled
    flipped = make_batch(raw, empty, TrainConfig(caption_dropout=0.0, flip_prob=1.0),
                         torch.Generator().manual_seed(1), 1.0, 0.0, torch.device("cpu"))
    assert (flipped.x0 - raw["mean_flip"]).abs().mean() < (flipped.x0 - raw["mean"]).abs().mean()


@pytest.mark.parametrize("objective", ["ddpm", "rectified_flow"])
@pytest.mark.parametrize("arch", ["dit", "cross", "mmdit", "unet"])
def test_every_arch_and_objective_trains(tiny_shards, tmp_path, arch, objective):
    s = train(tiny_shards, tmp_path / "run", arch, objective, steps=3, checkpoint_every=2)
    rows = list(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows)  # finite, positive
    assert s["steps"] == 3 and s["arch"] == arch
    assert [c.name for c in checkpoints(tmp_path / "run")] == ["checkpoint-000002", "checkpoint-000003"]
    info = json.loads((tmp_path / "run" / "final" / "ditpipe.json").read_text())
    assert info["arch"] == arch and info["objective"] == objective
    assert (tmp_path / "run" / "final" / "config.json").exists()
    assert_loads_the_ema_model(tmp_path / "run", arch)


def assert_loads_the_ema_model(run_dir, arch):
    """load_denoiser gives back exactly the EMA weights of the last checkpoint, as the same architecture."""
    loaded, info = load_denoiser(run_dir)
    assert loaded.arch == arch and info.arch == arch and not loaded.training
    state = torch.load(checkpoints(run_dir)[-1] / "state.pt", weights_only=True)
    model_cfg = info.config["model"]
    rebuilt = build_model(arch, info.size, info.spec, model_cfg["tokens"], model_cfg["mlp_conv"])
    for p, shadow in zip(rebuilt.parameters(), state["ema"]["shadow_params"]):
        p.data.copy_(shadow)
    for (name, a), b in zip(loaded.state_dict().items(), rebuilt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    x = torch.randn(2, *(info.spec.latent_channels, info.spec.latent_size, info.spec.latent_size))
    emb, mask, pooled = torch.randn(2, 8, info.spec.text_dim), torch.ones(2, 8, dtype=torch.long), torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, torch.tensor([3.0, 700.0]), emb, mask, pooled),
                                   rebuilt.eval()(x, torch.tensor([3.0, 700.0]), emb, mask, pooled))


def test_in_run_evaluation_logs_val_loss_grids_and_judge_accuracy(tiny_shards, tmp_path):
    """Every eval_every steps: val loss with fixed noise (same value for the same weights), a grid, accuracy."""
    out = tmp_path / "run"
    model_cfg = ModelConfig(arch="cross", size="T/2")
    cfg = TrainConfig(steps=4, batch_size=8, log_every=1, eval_every=2, eval_samples=4, eval_steps=2)
    resolved = to_dict(load_config(None, ["model.size=T/2"]))
    run(model_cfg, cfg, NO_TRACKING, tiny_shards / "shards", out, resolved, vae_dir=tiny_shards / "vae")
    rows = list(read_jsonl(out / "eval.jsonl"))
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["val_loss"] > 0 and 0 <= r["acc_color"] <= 1 and r["flops"] > 0
        assert {"acc_shape", "acc_relation", "acc_count"} <= set(r)
    assert rows[1]["flops"] == 2 * rows[0]["flops"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]
    again = tmp_path / "again"
    run(model_cfg, cfg, NO_TRACKING, tiny_shards / "shards", again, resolved, vae_dir=tiny_shards / "vae")
    assert [r["val_loss"] for r in read_jsonl(again / "eval.jsonl")] == [r["val_loss"] for r in rows]
    # training itself is untouched by the evaluations: same losses as a run without them
    quiet = tmp_path / "quiet"
    run(model_cfg, TrainConfig(steps=4, batch_size=8, log_every=1, eval_every=0), NO_TRACKING,
        tiny_shards / "shards", quiet, resolved)
    assert [r["loss"] for r in read_jsonl(quiet / "metrics.jsonl")] == [r["loss"] for r in
                                                                       read_jsonl(out / "metrics.jsonl")]
    assert not (quiet / "eval.jsonl").exists()


def test_checkpoints_keep_last_n_and_more_steps_resume(tiny_shards, tmp_path):
    train(tiny_shards, tmp_path / "run", steps=6, checkpoint_every=1, keep_checkpoints=2)
    assert [c.name for c in checkpoints(tmp_path / "run")] == ["checkpoint-000005", "checkpoint-000006"]
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-000006"
    meta = json.loads((ckpt / "trainer.json").read_text())
    assert meta["step"] == 6 and meta["samples_per_rank"] == 48 and meta["config"]["model"]["size"] == "T/2"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "state.pt", "trainer.json", "rng-rank0.pt",
                                                "checksums.json"}
    assert set(json.loads((ckpt / "checksums.json").read_text())) == {"model.safetensors", "state.pt",
                                                                       "trainer.json", "rng-rank0.pt"}
    s = train(tiny_shards, tmp_path / "run", steps=9, checkpoint_every=1, keep_checkpoints=2)
    assert s["resumed_from"] == 6 and s["trained"] == 3
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 10))
    again = train(tiny_shards, tmp_path / "run", steps=9, checkpoint_every=1, keep_checkpoints=2)
    assert again["trained"] == 0  # nothing left to do


def test_fewer_steps_than_the_run_has_trains_a_new_run_and_keeps_the_old(tiny_shards, tmp_path, capsys):
    """A run past train.steps is not passed off as a shorter one: it is kept aside and the shorter run trained."""
    train(tiny_shards, tmp_path / "run", steps=4)
    longer = (tmp_path / "run" / "final" / "diffusion_pytorch_model.safetensors").read_bytes()
    s = train(tiny_shards, tmp_path / "run", steps=2)
    assert s["resumed_from"] == 0 and s["trained"] == 2 and s["steps"] == 2
    assert json.loads((tmp_path / "run" / "final" / "ditpipe.json").read_text())["step"] == 2
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.cross-T_2-step4-")]
    assert (kept / "final" / "diffusion_pytorch_model.safetensors").read_bytes() == longer  # nothing lost
    assert "held a run at step 4, past train.steps=2" in capsys.readouterr().out
    assert train(tiny_shards, tmp_path / "run", steps=2)["trained"] == 0  # at its steps: nothing to do


def test_a_different_model_starts_over_and_keeps_the_old_run(tiny_shards, tmp_path, capsys):
    train(tiny_shards, tmp_path / "run", steps=2)
    first = (tmp_path / "run" / "final" / "diffusion_pytorch_model.safetensors").read_bytes()
    s = train(tiny_shards, tmp_path / "run", arch="dit", steps=2)
    assert s["resumed_from"] == 0 and s["trained"] == 2
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.cross-T_2-step2-")]
    assert len(kept) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert (kept[0] / "final" / "diffusion_pytorch_model.safetensors").read_bytes() == first  # nothing lost
    assert "model.arch" in capsys.readouterr().out  # says what changed
    s = train(tiny_shards, tmp_path / "run", arch="dit", steps=2, lr=1e-3)  # another lr: also kept, not deleted
    assert s["trained"] == 2 and len([p for p in tmp_path.iterdir() if p.name.startswith("run.dit-T_2-step2-")]) == 1


def test_a_failing_model_build_leaves_the_run_folder_alone(tiny_shards, tmp_path, monkeypatch):
    import ditpipe.train

    train(tiny_shards, tmp_path / "run", steps=2)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def refuse(arch, size, spec, **options):
        raise DitpipeError(f"{size} does not fit {spec.latent_size}px latents")

    monkeypatch.setattr(ditpipe.train, "build_model", refuse)
    with pytest.raises(DitpipeError, match="does not fit"):
        train(tiny_shards, tmp_path / "run", arch="dit", steps=2, lr=1e-3)  # another run: would move the old one
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    lambda c: _flip_a_byte(c / "model.safetensors"),  # loads fine, garbage weights: only the checksum sees it
    lambda c: (c / "state.pt").write_bytes((c / "state.pt").read_bytes()[:1000]),  # cut
    lambda c: (c / "trainer.json").unlink(),
])
def test_resume_skips_a_damaged_newest_checkpoint(tiny_shards, tmp_path, capsys, damage):
    train(tiny_shards, tmp_path / "run", steps=4, checkpoint_every=2)
    newest = checkpoints(tmp_path / "run")[-1]
    damage(newest)
    s = train(tiny_shards, tmp_path / "run", steps=6, checkpoint_every=2)
    assert s["resumed_from"] == 2 and s["steps"] == 6
    out = capsys.readouterr().out
    assert f"skipping {newest}" in out
    assert (newest.parent / "damaged-checkpoint-000004").is_dir()  # kept for a look, out of the way
    assert [c.name for c in checkpoints(tmp_path / "run")][-1] == "checkpoint-000006"


def test_no_verifying_checkpoint_starts_over_keeping_the_run(tiny_shards, tmp_path, capsys):
    train(tiny_shards, tmp_path / "run", steps=2, checkpoint_every=2)
    _flip_a_byte(checkpoints(tmp_path / "run")[0] / "state.pt")
    s = train(tiny_shards, tmp_path / "run", steps=2, checkpoint_every=2)
    assert s["resumed_from"] == 0 and s["trained"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("run.damaged-")]
    assert "no checkpoint" in capsys.readouterr().out


def test_a_second_train_on_one_folder_fails_naming_the_first(tiny_shards, tmp_path):
    from ditpipe.io import exclusive

    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ditpipe.io import exclusive\n"
                               f"with exclusive({str(tmp_path / 'run')!r}):\n print('held', flush=True); "
                               "time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DitpipeError, match=rf"in use by pid {holder.pid} \(.*-c"):
            train(tiny_shards, tmp_path / "run", steps=2)
        assert not (tmp_path / "run" / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    with exclusive(tmp_path / "run"):  # the killed holder's lock is taken over, no cleanup needed
        pass
    assert train(tiny_shards, tmp_path / "run", steps=2)["trained"] == 2


def _params(tmp_path, tiny_shards, steps):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {"shards": str(tiny_shards / "shards"), "train": str(tmp_path / "run")},
        "model": {"arch": "dit", "size": "T/2"},
        "train": {"steps": steps, "batch_size": 4, "log_every": 1, "checkpoint_every": 10, "warmup_steps": 5,
                  "shuffle_buffer": 16},
        "tracking": {"enabled": False},
    }))
    return params


@pytest.mark.slow
def test_kill_9_and_resume_gives_the_same_losses(tiny_shards, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    steps = 150
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for d in (straight, killed):
        d.mkdir()
    cmd = [sys.executable, "-m", "ditpipe", "train", "--params"]
    subprocess.run(cmd + [str(_params(straight, tiny_shards, steps))], env=env, check=True, capture_output=True)
    params = _params(killed, tiny_shards, steps)
    proc = subprocess.Popen(cmd + [str(params)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 35:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = len(metrics.read_text().splitlines())
    assert 35 <= logged < steps, f"the kill landed at step {logged} of {steps}"
    out = subprocess.run(cmd + [str(params)], env=env, check=True, capture_output=True, text=True).stdout
    assert "resumed from step" in out
    a = [(r["step"], r["loss"]) for r in read_jsonl(straight / "run" / "metrics.jsonl")]
    b = [(r["step"], r["loss"]) for r in read_jsonl(metrics)]
    assert len(a) == steps and a == b  # bit-for-bit the same per-step losses


@pytest.mark.slow
def test_mlflow_run_tells_what_was_trained_on_what(tiny_shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model_cfg, cfg = ModelConfig(arch="dit", size="T/2"), TrainConfig(steps=4, batch_size=4, log_every=2)
    resolved = to_dict(load_config(None, ["model.arch=dit", "model.size=T/2", "train.steps=4"]))
    s = run(model_cfg, cfg, TrackingConfig(uri=uri, experiment="t"), tiny_shards / "shards", tmp_path / "run",
            resolved)
    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(s["mlflow_run_id"])
    assert r.info.status == "FINISHED" and r.info.run_name == "dit-T_2-rectified_flow"
    assert r.data.params["model.arch"] == "dit" and r.data.params["train.lr"] == str(cfg.lr)
    assert r.data.tags["train.steps"] == "4" and "train.steps" not in r.data.params  # a resume may change it
    assert len(r.data.tags["ditpipe.shards_index_sha256"]) == 64
    assert not any(k.startswith("dvc.") for k in r.data.tags)  # not run by DVC: no dvc.lock hashes it may not have read
    history = client.get_metric_history(r.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4]
    for key in ("lr", "grad_norm", "images_per_s", "memory_mb", "train_flops", "val_loss"):
        assert key in r.data.metrics
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id, "model")}
    assert "model/config.json" in artifacts and "model/ditpipe.json" in artifacts
    assert (tmp_path / "mlruns").exists()  # artifacts at an absolute location, not wherever cwd was
    exp = client.get_experiment_by_name("t")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the run list
    # resumed to more steps: the same run, and it says how far it was trained
    cfg6 = TrainConfig(steps=6, batch_size=4, log_every=2)
    resolved["train"]["steps"] = 6
    again = run(model_cfg, cfg6, TrackingConfig(uri=uri, experiment="t"), tiny_shards / "shards", tmp_path / "run",
                resolved)
    assert again["mlflow_run_id"] == s["mlflow_run_id"] and again["resumed_from"] == 4
    assert client.get_run(s["mlflow_run_id"]).data.tags["train.steps"] == "6"


@pytest.mark.slow
def test_a_crashed_run_is_marked_failed_in_mlflow_not_left_running(tiny_shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import ditpipe.train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real, calls = ditpipe.train.optimizer_step, []

    def crashes_on_the_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ditpipe.train, "optimizer_step", crashes_on_the_third_step)
    with pytest.raises(OSError, match="disk full"):
        run(ModelConfig(arch="dit", size="T/2"), TrainConfig(steps=6, batch_size=4, eval_every=0),
            TrackingConfig(uri=uri, experiment="crash"), tiny_shards / "shards", tmp_path / "run",
            to_dict(load_config(None, ["model.arch=dit", "model.size=T/2"])))
    client = MlflowClient(tracking_uri=uri)
    (r,) = client.search_runs([client.get_experiment_by_name("crash").experiment_id])
    assert r.info.status == "FAILED"


def test_unreachable_tracking_server_fails_at_once_naming_it(tiny_shards, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with pytest.raises(DitpipeError, match=f"tracking.uri {uri} does not answer"):
        run(ModelConfig(arch="dit", size="T/2"), TrainConfig(steps=2, batch_size=4), TrackingConfig(uri=uri),
            tiny_shards / "shards", tmp_path / "run", {})
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "run").exists()  # before any work


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(tiny_shards, tmp_path):
    """DDP over gloo on CPU: both ranks train on disjoint samples; checkpoints are written once."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {"shards": str(tiny_shards / "shards"), "train": str(tmp_path / "run")},
        "model": {"arch": "cross", "size": "T/2"},
        "train": {"steps": 5, "batch_size": 4, "log_every": 1, "checkpoint_every": 5, "record_keys": True},
        "tracking": {"enabled": False},
    }))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    from tests.flows.test_pipeline import free_port

    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip",
         "127.0.0.1", "--main_process_port", str(free_port()), "-m", "ditpipe", "train", "--params", str(params)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("on 2 process(es)") == 1  # one summary line, from rank 0
    run_dir = tmp_path / "run"
    keys = {r: [k for row in read_jsonl(run_dir / f"keys-rank{r}.jsonl") for k in row["keys"]] for r in (0, 1)}
    assert len(keys[0]) == len(keys[1]) == 20  # both ranks trained every step
    assert not set(keys[0]) & set(keys[1])  # within the epoch no sample is seen by both ranks
    assert len(set(keys[0])) == 20 and len(set(keys[1])) == 20
    assert [c.name for c in checkpoints(run_dir)] == ["checkpoint-000005"]
    ckpt = run_dir / "checkpoints" / "checkpoint-000005"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "state.pt", "trainer.json", "rng-rank0.pt",
                                                "rng-rank1.pt", "checksums.json"}
    assert "rng-rank1.pt" in json.loads((ckpt / "checksums.json").read_text())  # every rank's file is covered
    assert json.loads((ckpt / "trainer.json").read_text())["world_size"] == 2
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5]  # logged once


def _launch_two_machines(params, port: int) -> list[subprocess.CompletedProcess]:
    """``accelerate launch`` as on two nodes: one process per machine, machine ranks 0 and 1, the rendezvous
    on 127.0.0.1 (on a real cluster: the first node's address, and the same command on each node)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--machine_rank",
         str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ditpipe", "train", "--params", str(params)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out


@pytest.mark.slow
def test_two_machines_train_and_resume(tiny_shards, tmp_path):
    """Two nodes (machine ranks 0 and 1, one process each) train 4 steps, then resume to 8: the second launch
    starts from the checkpoint, both ranks read disjoint samples, one copy of the logs."""
    from tests.flows.test_pipeline import free_port

    run_dir, params = tmp_path / "run", tmp_path / "params.yaml"

    def write(steps):
        params.write_text(yaml.safe_dump({
            "paths": {"shards": str(tiny_shards / "shards"), "train": str(run_dir)},
            "model": {"arch": "dit", "size": "T/2"},
            "train": {"steps": steps, "batch_size": 4, "log_every": 1, "checkpoint_every": 4, "record_keys": True},
            "tracking": {"enabled": False},
        }))

    write(4)
    first = _launch_two_machines(params, free_port())
    assert [p.returncode for p in first] == [0, 0], first[0].stderr[-2000:] + first[1].stderr[-2000:]
    assert [c.name for c in checkpoints(run_dir)] == ["checkpoint-000004"]
    assert json.loads((run_dir / "checkpoints" / "checkpoint-000004" / "trainer.json").read_text())["world_size"] == 2
    write(8)
    second = _launch_two_machines(params, free_port())
    assert [p.returncode for p in second] == [0, 0], second[0].stderr[-2000:] + second[1].stderr[-2000:]
    assert "resumed from step 4" in second[0].stdout and "resumed" not in second[1].stdout  # rank 0 speaks
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 9))
    rows = {r: list(read_jsonl(run_dir / f"keys-rank{r}.jsonl")) for r in (0, 1)}
    assert [row["step"] for row in rows[0]] == [row["step"] for row in rows[1]] == list(range(1, 9))
    first4 = [k for r in (0, 1) for row in rows[r][:4] for k in row["keys"]]
    assert len(set(first4)) == len(first4) == 2 * 4 * 4  # within the first epoch (48 samples) no repeats
    assert [c.name for c in checkpoints(run_dir)] == ["checkpoint-000004", "checkpoint-000008"]


def _launch_two_processes(params, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip",
         "127.0.0.1", "--main_process_port", str(port), "-m", "ditpipe", "train", "--params", str(params)],
        env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_fsdp_over_two_processes_checkpoints_whole_and_resumes_to_the_same_losses(tiny_shards, tmp_path):
    """FSDP2 (train.fsdp) on 2 CPU processes over gloo: a run stopped at step 4 and resumed to 8 logs the same
    per-step losses as one that ran straight to 8; checkpoints and final/ hold whole, unsharded weights."""
    from safetensors.torch import load_file

    from ditpipe.models import load_denoiser
    from tests.flows.test_pipeline import free_port

    def params(name, steps):
        path = tmp_path / f"{name}-{steps}.yaml"
        path.write_text(yaml.safe_dump({
            "paths": {"shards": str(tiny_shards / "shards"), "train": str(tmp_path / name)},
            "model": {"arch": "dit", "size": "T/2"},
            "train": {"steps": steps, "batch_size": 4, "log_every": 1, "checkpoint_every": 4, "fsdp": True,
                      "optimizer": "adamw", "eval_every": 4, "eval_samples": 2, "eval_steps": 2},
            "tracking": {"enabled": False},
        }))
        return path

    for name, steps in (("straight", 8), ("resumed", 4), ("resumed", 8)):
        proc = _launch_two_processes(params(name, steps), free_port())
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 4 on 2 process(es) (FSDP: sharded)" in proc.stdout
    a = [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")]
    b = [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")]
    assert len(a) == 8 and a == b
    weights = load_file(str(tmp_path / "straight" / "checkpoints" / "checkpoint-000008" / "model.safetensors"))
    plain = load_denoiser(tmp_path / "straight" / "final")[0]
    assert sum(v.numel() for v in weights.values()) == sum(p.numel() for p in plain.parameters())  # whole
    evals = list(read_jsonl(tmp_path / "straight" / "eval.jsonl"))  # in-run evaluations gathered the EMA shards
    assert [r["step"] for r in evals] == [4, 8] and all(r["val_loss"] > 0 for r in evals)


@pytest.mark.slow
def test_compiled_checkpointed_run_resumes_uncompiled(tiny_shards, tmp_path):
    """torch.compile and gradient checkpointing change how steps run, not what a checkpoint holds."""
    from safetensors.torch import load_file

    train(tiny_shards, tmp_path / "run", arch="dit", steps=2, compile=True, gradient_checkpointing=True)
    keys = load_file(str(checkpoints(tmp_path / "run")[-1] / "model.safetensors")).keys()
    assert all(k.startswith("inner.") for k in keys)
    s = train(tiny_shards, tmp_path / "run", arch="dit", steps=3)
    assert s["resumed_from"] == 2 and s["trained"] == 1


def test_lr_schedules():
    """Warm-up, then constant; or warm-up, then a cosine that ends at lr_min_ratio of the peak on the last step."""
    const = TrainConfig(steps=100, warmup_steps=10, lr_schedule="constant")
    assert [lr_factor(s, const) for s in (0, 4, 9, 50, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    cos = TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine", lr_min_ratio=0.1)
    curve = [lr_factor(s, cos) for s in range(100)]
    assert curve[:10] == [lr_factor(s, const) for s in range(10)]
    assert curve[10] == 1.0 and curve[55] == pytest.approx(0.55) and lr_factor(100, cos) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(curve[10:], curve[11:]))


def test_a_damaged_final_model_is_refused_by_its_readers(tiny_shards, tmp_path):
    train(tiny_shards, tmp_path / "run", steps=2)
    load_denoiser(tmp_path / "run")  # whole: loads
    _flip_a_byte(tmp_path / "run" / "final" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DitpipeError, match="final is damaged: diffusion_pytorch_model.safetensors does not match"):
        load_denoiser(tmp_path / "run")
