"""dvc.yaml and dvc.lock against the stage table and the code: the DVC pipeline cannot drift from what runs."""

import hashlib
from pathlib import Path

import pytest
import yaml
from ruamel.yaml import YAML

from ditpipe.stages import ORDER, STAGES, code_deps
from tests.conftest import committed

ROOT = Path(__file__).resolve().parents[1]


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_lists_the_stage_table_in_order():
    assert tuple(dvc_stages()) == ORDER


@pytest.mark.parametrize("name", ORDER)
def test_dvc_yaml_deps_are_every_imported_module_and_every_input(name):
    stage = dvc_stages()[name]
    expected = [*STAGES[name].code, *(f"${{paths.{key}}}" for key in STAGES[name].inputs)]
    assert sorted(stage["deps"]) == sorted(expected), (
        f"dvc.yaml stage {name!r} deps should be:\n" + "\n".join(f"      - {d}" for d in expected))
    assert stage.get("params", []) == list(STAGES[name].params)
    assert stage["cmd"] == f"ditpipe {name}"


def test_code_deps_follow_imports_transitively_and_across_packages():
    train = code_deps("ditpipe.train")
    assert "ditpipe/presets.py" in train  # via models.py
    assert "ditpipe/autoencoder.py" in train  # via monitor.py (in-run sample grids)
    assert "ditpipe/data/shapes.py" in train and "ditpipe/data/__init__.py" in train  # via judge.py
    latents = code_deps("ditpipe.latents")
    assert "ditpipe/io.py" in latents and "ditpipe/autoencoder.py" in latents
    assert "ditpipe/vae.py" not in latents  # stages do not import each other; latents reads the VAE's output


def test_code_deps_see_imports_inside_functions(tmp_path, monkeypatch):
    pkg = tmp_path / "ditpipe"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "deep.py").write_text("X = 1\n")
    (pkg / "leaf.py").write_text("def f():\n    from ditpipe.sub import deep\n    return deep.X\n")
    (pkg / "top.py").write_text("import os\nfrom ditpipe import leaf\n")
    import ditpipe.stages as stages

    monkeypatch.setattr(stages, "PACKAGE_DIR", pkg)
    stages.code_deps.cache_clear()
    try:
        assert stages.code_deps("ditpipe.top") == ("ditpipe/__init__.py", "ditpipe/leaf.py", "ditpipe/sub/__init__.py",
                                                   "ditpipe/sub/deep.py", "ditpipe/top.py")
    finally:
        stages.code_deps.cache_clear()


def test_committed_dvc_lock_matches_the_committed_code_and_params():
    load = YAML(typ="safe").load  # YAML 1.2, as DVC reads both files ("1e-06" is a number there)
    lock = load(committed("dvc.lock"))["stages"]
    params = load(committed("params.yaml"))
    stale = []
    for name in ORDER:
        assert name in lock, f"dvc.lock has no stage {name!r}: run `dvc repro` (or `dvc commit {name}`)"
        code = {d["path"]: d["md5"] for d in lock[name]["deps"] if d["path"].startswith("ditpipe/")}
        if sorted(code) != sorted(STAGES[name].code):
            stale.append(f"{name}: deps {sorted(set(code) ^ set(STAGES[name].code))} differ from dvc.yaml")
        stale += [f"{name}: {path} changed since dvc.lock was written" for path, md5 in code.items()
                  if path in STAGES[name].code and hashlib.md5(committed(path)).hexdigest() != md5]
        locked = lock[name].get("params", {}).get("params.yaml", {})
        stale += [f"{name}: params section {section!r} differs" for section in STAGES[name].params
                  if locked.get(section) != params[section]]
    assert not stale, "the committed dvc.lock is stale (run `dvc repro`, commit dvc.lock):\n" + "\n".join(stale)
