"""Shared by the bench sections that time whole `python -m saelab` runs (`multi`, `parallel`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def run_saelab(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    """Wall time of one `python -m saelab ...` process (model loads and process start included: what a
    user pays); its output goes to `cwd/<n>.log`, and a failure raises with the log's tail."""
    cwd.mkdir(parents=True, exist_ok=True)
    log = cwd / f"{len(list(cwd.glob('*.log')))}.log"
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.run(
            [sys.executable, "-m", "saelab", *args], cwd=cwd, env=full_env, stdout=f, stderr=subprocess.STDOUT
        )
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"python -m saelab {' '.join(args)} failed ({p.returncode}):\n{tail}")
    return seconds
