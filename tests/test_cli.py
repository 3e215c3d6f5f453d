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


def test_missing_upstream_is_named(tmp_path, cli):
    proc = cli("latents", cwd=tmp_path)
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


def test_full_disk_is_one_line_naming_the_path(tmp_path, mounted, cli):
    disk = mounted("size=64k")
    args = ("prepare", "--set", f"paths.prepared={disk}/prepared", "--set", "data.count=200")
    proc = cli(*args, cwd=tmp_path)
    _one_line_error(proc, "ditpipe prepare: error: No space left on device", str(disk), "the disk is full")
    assert [p.name for p in disk.iterdir()] == [".prepared.lock"]  # the half-written temp folder is gone
    with pytest.raises(OSError, match="No space left"):  # --debug lets the error (and its traceback) through
        cli(*args, "--debug", cwd=tmp_path)


def test_read_only_folder_is_one_line(tmp_path, mounted, cli):
    disk = mounted("ro,size=64k")
    proc = cli("prepare", "--set", f"paths.prepared={disk}/prepared", "--set", "data.count=20", cwd=tmp_path)
    _one_line_error(proc, "Read-only file system", str(disk), "point paths.* somewhere writable")


def test_a_file_where_a_folder_should_be_is_one_line(tmp_path, cli):
    (tmp_path / "artifacts").write_text("not a folder")
    proc = cli("prepare", "--set", "data.count=20", cwd=tmp_path)
    _one_line_error(proc, "ditpipe prepare: error:", "artifacts")


def _train_params(tmp_path, shards, run_dir, **train):
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "paths": {"shards": str(shards), "train": str(run_dir)},
        "model": {"size": "T/2"}, "train": {"steps": 3, "batch_size": 4, "eval_every": 0, **train},
        "tracking": {"enabled": False}}))


def test_a_missing_shard_in_a_dataloader_worker_is_one_line(tiny_shards, tmp_path, cli):
    import shutil

    shutil.copytree(tiny_shards / "shards", tmp_path / "shards")
    first = sorted((tmp_path / "shards").glob("train-*.tar"))[0]
    first.unlink()
    _train_params(tmp_path, tmp_path / "shards", tmp_path / "run", num_workers=2)
    proc = cli("train", cwd=tmp_path)
    _one_line_error(proc, "ditpipe train: error: shard", f"{first.name} is missing", "re-run `ditpipe shards`")


def test_train_on_a_full_disk_is_one_line(tiny_shards, tmp_path, mounted, cli):
    disk = mounted("size=200k")  # room for the metrics, not for a checkpoint
    _train_params(tmp_path, tiny_shards / "shards", disk / "run", steps=2, checkpoint_every=2)
    line = _one_line_error(cli("train", cwd=tmp_path), "ditpipe train: error:", str(disk / "run"))
    assert "MB free there" in line or "disk is full" in line
    assert not list((disk / "run" / "checkpoints").glob(".tmp-*"))  # no half-written checkpoint left behind
