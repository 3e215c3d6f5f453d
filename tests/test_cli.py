import subprocess

import pytest

from tests.conftest import run_cli


def test_help_lists_every_stage():
    out = run_cli("--help").stdout
    for stage in ("prepare", "vae", "latents", "text", "shards", "params"):
        assert stage in out


def test_stage_help_shows_params_and_set():
    out = run_cli("latents", "--help").stdout
    assert "--set KEY=VALUE" in out and "--params FILE" in out


def test_bad_override_is_one_line_not_a_traceback(tmp_path):
    proc = run_cli("prepare", "--set", "data.resolution=33", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "data.resolution must be a positive multiple of 8, got 33" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "artifacts").exists()  # failed before any work


def test_missing_upstream_is_named(tmp_path):
    proc = run_cli("latents", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "run `ditpipe prepare` first" in proc.stderr and "Traceback" not in proc.stderr


def test_params_lists_keys_with_help():
    out = run_cli("params").stdout
    assert "data.resolution" in out and "multiple of 8" in out
    resolved = run_cli("params", "--resolved", "--set", "data.count=7").stdout
    assert "count: 7" in resolved


def _one_line_error(proc, *expected):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines()  # progress bars and MLflow's database set-up notes aside
             if ln.strip() and "%|" not in ln and " INFO " not in ln and not ln.startswith("INFO ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def mounted(tmp_path):
    """A real small file system (tmpfs) to fill up or make read-only; needs root, as on CI."""
    made = []

    def mount(options: str):
        where = tmp_path / f"mnt{len(made)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}): needs root")
        made.append(where)
        return where

    yield mount
    for where in made:
        subprocess.run(["umount", str(where)], check=False)


def test_full_disk_is_one_line_naming_the_path(tmp_path, mounted):
    disk = mounted("size=64k")
    proc = run_cli("prepare", "--set", f"paths.prepared={disk}/prepared", "--set", "data.count=200", cwd=tmp_path,
                   check=False)
    _one_line_error(proc, "ditpipe prepare: error: No space left on device", str(disk), "the disk is full")
    assert [p.name for p in disk.iterdir()] == [".prepared.lock"]  # the half-written temp folder is gone
    debug = run_cli("prepare", "--debug", "--set", f"paths.prepared={disk}/prepared", "--set", "data.count=200",
                    cwd=tmp_path, check=False)
    assert "Traceback" in debug.stderr and "OSError" in debug.stderr  # --debug shows where


def test_read_only_folder_is_one_line(tmp_path, mounted):
    disk = mounted("ro,size=64k")
    proc = run_cli("prepare", "--set", f"paths.prepared={disk}/prepared", "--set", "data.count=20", cwd=tmp_path,
                   check=False)
    _one_line_error(proc, "Read-only file system", str(disk), "point paths.* somewhere writable")


def test_a_file_where_a_folder_should_be_is_one_line(tmp_path):
    (tmp_path / "artifacts").write_text("not a folder")
    proc = run_cli("prepare", "--set", "data.count=20", cwd=tmp_path, check=False)
    _one_line_error(proc, "ditpipe prepare: error:", "artifacts")


def test_a_missing_shard_in_a_dataloader_worker_is_one_line(tiny_shards, tmp_path):
    import shutil

    import yaml

    shutil.copytree(tiny_shards / "shards", tmp_path / "shards")
    first = sorted((tmp_path / "shards").glob("train-*.tar"))[0]
    first.unlink()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "paths": {"shards": str(tmp_path / "shards"), "train": str(tmp_path / "run")},
        "model": {"size": "T/2"}, "train": {"steps": 3, "batch_size": 4, "num_workers": 2, "eval_every": 0},
        "tracking": {"enabled": False}}))
    proc = run_cli("train", cwd=tmp_path, check=False, env={"TQDM_DISABLE": "1"})
    _one_line_error(proc, "ditpipe train: error: shard", f"{first.name} is missing", "re-run `ditpipe shards`")


def test_train_on_a_full_disk_is_one_line(tiny_shards, tmp_path, mounted):
    import yaml

    disk = mounted("size=200k")  # room for the metrics, not for a checkpoint
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "paths": {"shards": str(tiny_shards / "shards"), "train": str(disk / "run")},
        "model": {"size": "T/2"}, "train": {"steps": 2, "batch_size": 4, "eval_every": 0, "checkpoint_every": 2},
        "tracking": {"enabled": False}}))
    proc = run_cli("train", cwd=tmp_path, check=False, env={"TQDM_DISABLE": "1"})
    line = _one_line_error(proc, "ditpipe train: error:", str(disk / "run"))
    assert "MB free there" in line or "disk is full" in line
    assert not list((disk / "run" / "checkpoints").glob(".tmp-*"))  # no half-written checkpoint left behind
