"""A wheel of tdkd works on its own: recipes and the SST-2 sample are package data."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args, cwd, env=None):
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(map(str, args))}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res.stdout


def test_wheel_installs_into_a_fresh_environment_and_runs(tmp_path):
    """Build the wheel (offline, no build isolation), install it into a fresh virtual environment that
    sees the same pinned torch and libraries (a .pth to this environment's site-packages, not its
    tdkd), and from a directory outside the checkout list the recipes and run a two-step distill on
    the packaged SST-2 sample."""
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(wheels), str(REPO)], cwd=tmp_path)
    (wheel,) = wheels.glob("tdkd-*.whl")
    env_dir = tmp_path / "fresh"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=tmp_path)
    py = env_dir / "bin" / "python"
    fresh_site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip())
    (fresh_site / "shared-libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps", "--no-index", "--no-compile",
          str(wheel)], cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["TDKD_CACHE"] = str(tmp_path / "cache")
    where = _run([str(py), "-c", "import tdkd_cli; print(tdkd_cli.__file__)"], cwd=tmp_path, env=env)
    assert str(fresh_site) in where and str(REPO) not in where  # the wheel's copy, not the checkout
    tdkd = env_dir / "bin" / "tdkd"
    listed = _run([str(tdkd), "recipes"], cwd=tmp_path, env=env)
    assert "sst2-demo" in listed and "digits-cnn" in listed
    _run([str(tdkd), "distill", "--teacher", "none", "--student", "tinybert", "--init", "random",
          "--data", "builtin:sst2-sample", "--train-limit", "64", "--dev-limit", "32", "--max-steps", "2",
          "--batch-size", "8", "--device", "cpu", "-o", str(tmp_path / "run")], cwd=tmp_path, env=env)
    assert (tmp_path / "run" / "best" / "tdkd.json").is_file()


@pytest.mark.parametrize("name", ["sst2-demo", "digits-cnn"])
def test_recipes_are_package_data(name):
    from tdkd_cli.core import recipe

    assert recipe.builtin_dir() == REPO / "tdkd_cli" / "recipes"
    assert (recipe.builtin_dir() / f"{name}.yaml").is_file()
