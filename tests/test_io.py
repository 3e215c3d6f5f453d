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


def test_readers_find_the_old_output_or_the_new_one_at_every_instant_of_a_swap(tmp_path):
    """A reader process polls the output while it is replaced 1,000 times. With the swap as two renames it
    found nothing about once in a hundred reads around a swap; exchanged in one step it never does."""
    import subprocess
    import sys

    final, stop = tmp_path / "shards", tmp_path / "stop"
    with staged_dir(final) as tmp:
        (tmp / "index.json").write_text("0")
    reader = subprocess.Popen([sys.executable, "-c", f"""import os
reads = misses = 0
while not os.path.exists({str(stop)!r}):
    reads += 1
    misses += not os.path.exists({str(final / "index.json")!r})
print(reads, misses)"""], stdout=subprocess.PIPE, text=True)
    try:
        for i in range(1000):
            with staged_dir(final) as tmp:
                (tmp / "index.json").write_text(str(i + 1))
    finally:
        stop.touch()
    reads, misses = map(int, reader.communicate(timeout=30)[0].split())
    assert reads > 10_000 and misses == 0, f"{misses} of {reads} reads found no output"
    assert (final / "index.json").read_text() == "1000"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shards.lock", "shards", "stop"]


def test_a_kill_right_after_the_swap_leaves_the_new_output_and_the_next_run_removes_the_old(tmp_path, monkeypatch):
    import shutil

    from ditpipe import io

    final = tmp_path / "prepared"
    with staged_dir(final) as tmp:
        (tmp / "v").write_text("old")
    real_rmtree = shutil.rmtree

    def killed(path, *a, **k):  # the process dies as it starts removing the swapped-out folder
        raise KeyboardInterrupt

    monkeypatch.setattr(io.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt), staged_dir(final) as tmp:
        (tmp / "v").write_text("new")
    monkeypatch.setattr(io.shutil, "rmtree", real_rmtree)
    assert (final / "v").read_text() == "new"
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-prepared-")]
    assert len(left) == 1 and (left[0] / "v").read_text() == "old"
    monkeypatch.setattr(io, "_pid_alive", lambda pid: False)  # as after the kill: its pid is gone
    with staged_dir(final) as tmp:
        (tmp / "v").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prepared.lock", "prepared"]


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
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["shards", live.name, ".shards.lock"])
    assert (final / "index.json").exists()


def _hold(folder, seconds):
    """A process holding ``folder``'s lock; returns once it holds it."""
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.Popen([sys.executable, "-c", "import time; from ditpipe.io import exclusive\n"
                             f"with exclusive({str(folder)!r}):\n print('held', flush=True); time.sleep({seconds})"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_fails_naming_the_first_or_waits_when_asked(tmp_path, monkeypatch, capsys):
    import time

    from ditpipe.errors import DitpipeError
    from ditpipe.io import WAIT_ENV, exclusive

    holder = _hold(tmp_path / "out", 1.5)
    try:
        with pytest.raises(DitpipeError, match=rf"out is in use by pid {holder.pid} \(-c, since .*--wait"):
            with exclusive(tmp_path / "out"):
                pass
        monkeypatch.setenv(WAIT_ENV, "1")
        t = time.time()
        with exclusive(tmp_path / "out"):
            assert time.time() - t > 0.3  # queued behind the holder, then ran
        assert f"waiting for pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_writers_lock_is_taken_over_and_said_so(tmp_path, capsys):
    from ditpipe.io import exclusive

    holder = _hold(tmp_path / "out", 60)
    holder.kill()
    holder.wait()
    with exclusive(tmp_path / "out"):
        pass
    assert f"from pid {holder.pid}" in capsys.readouterr().err
    with exclusive(tmp_path / "out"):  # released cleanly this time: nothing to report
        pass
    assert "taking over" not in capsys.readouterr().err


def test_where_the_filesystem_cannot_exchange_the_swap_falls_back_to_two_renames(tmp_path, monkeypatch):
    from ditpipe import io

    final = tmp_path / "latents"
    with staged_dir(final) as tmp:
        (tmp / "v").write_text("old")
    monkeypatch.setattr(io, "exchange", lambda a, b: False)
    with staged_dir(final) as tmp:
        (tmp / "v").write_text("new")
    assert (final / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".latents.lock", "latents"]


def test_exchange_swaps_two_folders_and_names_a_missing_one(tmp_path):
    from ditpipe.io import exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    assert exchange(a, b) and (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    with pytest.raises(FileNotFoundError, match="missing"):
        exchange(a, tmp_path / "missing")
