"""The compare recipe (BatchTopK vs OrtSAE vs Matryoshka) end to end on tiny settings."""

from __future__ import annotations

import json

import pytest
from support import run_cli

pytestmark = pytest.mark.slow  # three fits through the CLI


def test_compare_recipe_tiny(tmp_path):
    run_cli(
        "+experiment=compare_synthetic",
        "logger=none",
        "trainer.max_steps=30",
        "data.batch_size=256",
        "sae.d_sae=128",
        run_dir=tmp_path,
    )
    res = json.loads((tmp_path / "results.json").read_text())["variants"]
    assert set(res) == {"batchtopk", "ortsae", "matryoshka"}
    for v in res.values():
        assert 0 <= v["absorption"] <= 1 and v["l0"] > 0
    assert (tmp_path / "compare.png").exists() and (tmp_path / "ortsae" / "sae" / "cfg.json").exists()
