"""A real package: the wheel carries conf/ and data/, installs non-editable into a fresh venv, and runs
from an unrelated working directory (the venv borrows this one's dependencies; crabsweep itself is the wheel's)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_runs_from_anywhere(tmp_path):
    dist, src = tmp_path / "dist", tmp_path / "src"      # built from a copy: nothing written into the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "multirun", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "wandb"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("crabsweep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "crabsweep/conf/config.yaml" in names and "crabsweep/data/critique/01_lighthouse.json" in names
    assert "crabsweep/conf/model/tiny_llama.yaml" in names and "crabsweep/data/generic/texts.json" in names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, transformers, …) from this interpreter's site-packages, without its .pth files
    # (so the editable crabsweep of the development venv is not visible)
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
                   check=True, capture_output=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run([str(py), "-c", "import crabsweep, sys; print(crabsweep.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert where.startswith(site), where
    proc = subprocess.run([str(py), "-m", "crabsweep.cli", "round", "model=tiny_llama", "task=tiny", "train.epochs=1",
                           "eval.max_new_tokens=2", "hydra.run.dir=run"], cwd=elsewhere, capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (elsewhere / "run" / "round_0" / "record.json").exists()
    cfg = (elsewhere / "run" / ".hydra" / "config.yaml").read_text()
    assert f"{site}/crabsweep/data/tiny" in cfg                        # the task came from the installed package
