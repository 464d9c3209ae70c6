"""The `trainer=gpu` path (one CUDA device, bf16-mixed): skipped where no GPU is present."""

from __future__ import annotations

import json

import pytest
import torch
from support import run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_gpu_bf16_fit_matches_the_cpu_quality(tmp_path):
    common = ["data.d_in=32", "data.n_features=128", "sae.d_sae=128", "sae.activation.k=4", "logger=none"]
    run_cli(*common, "trainer=gpu", "trainer.max_steps=300", run_dir=tmp_path / "gpu")
    run_cli(*common, "trainer.max_steps=300", run_dir=tmp_path / "cpu")
    gpu = json.loads((tmp_path / "gpu" / "results.json").read_text())["metrics"]
    cpu = json.loads((tmp_path / "cpu" / "results.json").read_text())["metrics"]
    assert gpu["train/steps"] == 300
    # bf16 autocast changes the arithmetic, not what is learned
    assert gpu["eval/explained_variance"] > cpu["eval/explained_variance"] - 0.05
    assert abs(gpu["eval/l0"] - cpu["eval/l0"]) < 0.5
