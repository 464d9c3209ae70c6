"""Two jobs of a joblib multirun in parallel against the same two jobs run one after the other.

Both sides are `python -m saelab -m sae.activation.k=8,16` on the synthetic source: once with Hydra's
basic launcher (the jobs in series, each with every core) and once with `hydra/launcher=joblib
hydra.launcher.n_jobs=2`, where `saelab.sweep.ThreadsPerJob` gives each job cores / 2 threads. Target:
parallel ≤ 1.1× series (without the split each job would use every core and the pair would thrash).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from saelab.bench.runs import run_saelab
from saelab.bench.topk import _table

TARGET = 1.1


def main(args: argparse.Namespace) -> list[str]:
    quick = getattr(args, "quick", False)
    steps = getattr(args, "steps", None) or (20 if quick else 600)
    size = ["data.d_in=32", "data.batch_size=64", "sae.d_sae=128"] if quick else [
        "data.d_in=128", "data.n_features=1024", "data.batch_size=1024", "sae.d_sae=2048"
    ]  # fmt: skip
    common = ["-m", "sae.activation.k=8,16", "logger=none", f"trainer.max_steps={steps}", *size]
    common += ["+trainer.enable_progress_bar=false"]
    work = Path(tempfile.mkdtemp(prefix="saelab-bench-parallel-"))
    try:
        series = run_saelab([*common, f"hydra.sweep.dir={work}/series"], work)
        parallel = run_saelab(
            [*common, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={work}/parallel"],
            work,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = parallel / series
    mark = "ok" if ratio <= TARGET else "MISSES"
    return [
        f"two jobs (TopK k=8, 16; synthetic, {steps} steps, evaluators on) in series vs joblib n_jobs=2",
        *_table(
            ["launcher", "wall s", "vs series"],
            [
                ["basic (series)", f"{series:.1f}", "1.000x"],
                ["joblib, 2 jobs", f"{parallel:.1f}", f"{ratio:.3f}x ({mark}, target ≤ {TARGET}x)"],
            ],
        ),
    ]
