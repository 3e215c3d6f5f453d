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
