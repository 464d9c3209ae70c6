"""The `saelab` command as a user meets it: help, shell completion, where runs land, errors in the run log,
and a wheel installed in a fresh venv that runs from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from support import ROOT

from saelab.sweep import is_wandb_sweep

BIN = Path(sys.executable).parent
SAES = sorted(p.stem for p in (ROOT / "conf" / "sae").glob("*.yaml"))
# a user's shell: no SAELAB_ROOT (conftest sets it for the in-process tests), W&B offline
ENV = {k: v for k, v in os.environ.items() if k != "SAELAB_ROOT"} | {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
}


def saelab(*args: str, cwd: Path, exe: Path = BIN / "saelab", env: dict | None = None, timeout: float = 120):
    if not exe.exists():
        pytest.fail(f"no console script at {exe}: reinstall with `pip install -e .`")
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout
    )


def complete(line: str, cwd: Path, exe: Path = BIN / "saelab") -> list[str]:
    """What bash completion offers for `line`: the query Hydra's completion script makes."""
    env = ENV | {"COMP_LINE": line, "COMP_POINT": str(len(line))}
    p = saelab("-sc", "query=bash", cwd=cwd, exe=exe, env=env)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_help_lists_the_sweeps_group(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "saelab", "--help"], cwd=tmp_path, env=ENV, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    groups = p.stdout.split("== Config ==")[0]
    # every Hydra sweep file, not the W&B sweep spec beside them
    files = sorted((ROOT / "sweeps").glob("*.yaml"))
    hydra_sweeps = [p.stem for p in files if not is_wandb_sweep(OmegaConf.load(p))]
    assert {"ortho_coeff", "topk_k", "optuna_topk"} <= set(hydra_sweeps)
    assert f"sweeps: {', '.join(hydra_sweeps)}" in groups, groups


def test_completion_offers_config_groups_only(tmp_path):
    assert complete("saelab sae=", tmp_path) == [f"sae={s}" for s in SAES]
    top = complete("saelab ", tmp_path)
    assert {"sae=", "trainer=", "sweeps=", "experiment="} <= set(top), top
    stray = [w for w in top if w.startswith(".") or w.rstrip("/=") in {"outputs", "tests", "saelab", "conf"}]
    assert not stray, f"folders of the repository offered as config groups: {stray}"


def test_runs_land_under_the_working_directory(tmp_path):
    p = saelab("--cfg", "all", "--resolve", "-p", "hydra.run.dir", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    run_dir = (tmp_path / p.stdout.strip()).resolve()
    assert run_dir.is_relative_to(tmp_path / "outputs" / "train"), run_dir


def test_errors_reach_the_run_log(tmp_path):
    p = saelab("recipe.name=nope", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert p.returncode == 2 and "saelab: error: ValueError: unknown recipe 'nope'" in p.stderr, p.stderr
    assert "unknown recipe" not in p.stdout, "the error is printed once, on stderr"
    assert "unknown recipe 'nope'" in (tmp_path / "run" / "__main__.log").read_text()


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_from_any_directory(tmp_path):
    """`pip wheel .` → a venv holding only that wheel (its dependencies seen through a .pth file pointing at
    this venv) → `saelab +experiment=topk_synthetic +debug=tiny` from an unrelated directory."""
    src = tmp_path / "src"  # build from a copy: an in-tree build would leave build/ in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("saelab", "conf", "sweeps"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        tmp_path / "dist",
        src,
    )
    (wheel,) = (tmp_path / "dist").glob("saelab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"saelab/conf/config.yaml", "saelab/conf/sae/topk.yaml", "saelab/sweeps/topk_k.yaml"} <= names
    assert "saelab/interp/prompts.yaml" in names  # package data read at run time

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", wheel)
    site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, hydra, ... from here

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run(py, "-c", "import saelab; print(saelab.__file__)", cwd=work).stdout.strip()
    assert Path(where).is_relative_to(venv), f"saelab imported from {where}, not from the wheel"
    assert complete("saelab sae=", work, exe=venv / "bin" / "saelab") == [f"sae={s}" for s in SAES]

    p = saelab(
        "+experiment=topk_synthetic", "+debug=tiny", cwd=work, exe=venv / "bin" / "saelab", timeout=600
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (run_dir,) = (work / "outputs" / "topk_synthetic").iterdir()
    for name in ("results.json", "report.md", "sae/sae_weights.safetensors", ".hydra/config.yaml"):
        assert (run_dir / name).is_file(), f"{name} missing from {run_dir}"
