"""Atomic stage outputs: what a killed run leaves behind is cleaned up or put back on the next run."""

import os

import pytest

from ditpipe.io import staged_dir


def dead_pid() -> int:
    pid = 4_000_000  # above the default pid_max unless raised; checked, not assumed
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        pid += 1


def test_a_kill_between_the_two_renames_gets_the_previous_output_back(tmp_path):
    final = tmp_path / "prepared"
    old = tmp_path / ".tmp-old-prepared"  # the kill fell after `final -> old`, before `tmp -> final`
    old.mkdir()
    (old / "samples.jsonl").write_text("previous\n")
    with pytest.raises(RuntimeError), staged_dir(final):
        raise RuntimeError("this run fails too")
    assert (final / "samples.jsonl").read_text() == "previous\n" and not old.exists()


def test_temp_folders_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    final = tmp_path / "shards"
    final.mkdir()
    stale = [tmp_path / f".tmp-shards-{dead_pid()}-abc", tmp_path / ".tmp-shards-k3j2l1", tmp_path / ".tmp-old-shards"]
    live = tmp_path / f".tmp-shards-{os.getppid()}-xyz"  # a process that is running (our parent)
    for d in (*stale, live):
        d.mkdir()
        (d / "part.tar").write_bytes(b"x" * 100)
    with staged_dir(final) as tmp:
        assert str(os.getpid()) in tmp.name
        (tmp / "index.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["shards", live.name])
    assert (final / "index.json").exists()
