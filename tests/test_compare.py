"""`ditpipe compare`'s core: the experiment grid, reading `dvc exp show --json`, the table.

The command itself (queue, run, read back, MLflow) runs end to end in tests/test_e2e.py.
"""

import pytest

from ditpipe import compare
from ditpipe.errors import ConfigError, DitpipeError


def test_plan_is_the_full_grid_with_git_safe_names():
    exps = compare.plan(["dit", "unet"], ["XS/4", "T/2"], ["rectified_flow", "ddpm"])
    assert len(exps) == 8 and len({e.name for e in exps}) == 8
    assert exps[0] == compare.Experiment("cmp-dit-xs-4-rf", "dit", "XS/4", "rectified_flow")
    assert exps[-1].overrides() == ["model.arch=unet", "model.size=T/2", "train.objective=ddpm"]
    assert all("/" not in e.name for e in exps)


@pytest.mark.parametrize("archs, sizes, objectives, message", [
    (["vit"], ["XS/4"], ["ddpm"], "--arch must be one of"),
    (["dit"], ["XS/4"], ["edm"], "--objective must be one of"),
    (["dit"], [], ["ddpm"], "at least one"),
])
def test_plan_rejects_bad_values_by_name(archs, sizes, objectives, message):
    with pytest.raises(DitpipeError, match=message):
        compare.plan(archs, sizes, objectives)


def test_plan_rejects_a_bad_size():
    with pytest.raises(ConfigError, match="'XS/3'"):
        compare.plan(["dit"], ["XS/3"], ["ddpm"])


def _rev(name: str, rev: str, arch: str, metrics: dict | None) -> dict:
    data = {"rev": rev, "params": {"params.yaml": {"data": {"paths": {"metrics": "artifacts/metrics.json"},
                                                            "model": {"arch": arch, "size": "T/2"}}}}}
    data["metrics"] = ({"artifacts/metrics.json": {"data": metrics}} if metrics is not None else
                       {"artifacts/metrics.json": {"error": {"type": "FileNotFoundError", "msg": "missing"}}})
    return {"rev": rev, "name": name, "data": data, "error": None, "experiments": None}


METRICS = {"step": 4, "n": 3, "fid": 250.5, "kid": 0.12,
           "accuracy": {"color": 0.5, "shape": 0.25, "relation": None, "count": 1.0},
           "train": {"parameters": 1_500_000, "gflops_per_image": 0.0123, "train_flops": 1e12,
                     "images_per_s": 210.0, "train_seconds": 33.3}}


def test_rows_read_metrics_and_mark_what_failed():
    show = [{"rev": "workspace", "name": None, "data": {}, "experiments": None},
            {"rev": "abc", "name": "main", "data": {}, "experiments": [
                {"revs": [_rev("cmp-dit-t-2-rf", "r1", "dit", METRICS)], "executor": {"state": "success"}},
                {"revs": [_rev("cmp-unet-t-2-rf", "r2", "unet", None)], "executor": {"state": "failed"}},
            ]}]
    found = compare.experiments_of(show)
    assert set(found) == {"cmp-dit-t-2-rf", "cmp-unet-t-2-rf"} and found["cmp-dit-t-2-rf"]["rev"] == "r1"
    exps = compare.plan(["dit", "unet", "mmdit"], ["T/2"], ["rectified_flow"])
    rows = [compare.row(e, found.get(e.name)) for e in exps]
    ok, failed, missing = rows
    assert ok["ok"] and ok["params_m"] == 1.5 and ok["fid"] == 250.5 and ok["color"] == 0.5 and ok["rev"] == "r1"
    assert not failed["ok"] and failed["fid"] is None and not missing["ok"] and missing["rev"] is None

    table = compare.markdown(rows).splitlines()
    assert table[0].startswith("| experiment | arch | size | objective | params (M) | GFLOPs/img")
    assert table[2] == ("| cmp-dit-t-2-rf | dit | T/2 | rectified_flow | 1.50 | 0.012 | 33 | 210 | 3 | 250.5 | "
                        "0.120 | 50% | 25% | - | 100% |")
    assert table[3].startswith("| cmp-unet-t-2-rf (failed) | unet |") and table[3].endswith("| - | - | - | - |")
    assert len(table) == 5


def test_plot_draws_curves_and_final_points(tmp_path):
    exps = compare.plan(["dit"], ["T/2"], ["rectified_flow"])
    row = compare.row(exps[0], {"rev": "r", "params": {"paths": {"metrics": "m.json"}}, "metrics": {"m.json": METRICS}})
    series = {row["experiment"]: [{"flops": 1e11, "acc_color": 0.2, "acc_shape": 0.1},
                                  {"flops": 5e11, "acc_color": 0.4, "acc_shape": 0.2}]}
    compare.plot(tmp_path / "c.png", [row], series)
    assert (tmp_path / "c.png").stat().st_size > 5_000


def _git_dvc_repo(path):
    import subprocess

    path.mkdir()
    (path / "params.yaml").write_text("n: 1\n")
    (path / "dvc.yaml").write_text("stages:\n  echo:\n    cmd: echo ${n} > out.txt\n    params: [n]\n"
                                   "    outs: [out.txt]\n")
    for cmd in (["git", "init", "-q"], [compare.dvc_exe(), "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=path, check=True, capture_output=True)
    return path


def test_old_queue_tasks_of_the_same_names_are_forgotten_and_an_untracked_lock_is_named(tmp_path, capsys):
    """A second compare with the same names must follow its own runs' logs, not the first one's; and a dvc.lock
    git does not track (queued experiments cannot see it, so they rerun every stage) is said."""
    import os

    repo, env = _git_dvc_repo(tmp_path / "repo"), dict(os.environ)
    for name in ("cmp-a", "cmp-a", "other"):
        compare._dvc(["exp", "run", "--queue", "-n", name, "-S", "n=2"], repo, env, capture=True)

    def names() -> list[str]:
        status = compare._dvc(["queue", "status"], repo, env, capture=True).splitlines()[1:]
        return [line.split()[1] for line in status if len(line.split()) > 3 and not line.startswith("Worker")]

    assert sorted(names()) == ["cmp-a", "cmp-a", "other"]
    compare.forget_tasks(["cmp-a", "cmp-b"], repo, env)
    assert names() == ["other"]

    compare.lock_note(repo)
    assert capsys.readouterr().err == ""  # no dvc.lock at all: nothing to say
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    compare.lock_note(repo)
    assert "git does not track dvc.lock" in capsys.readouterr().err
