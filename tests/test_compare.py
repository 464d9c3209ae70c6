"""The compare recipe (BatchTopK vs OrtSAE vs Matryoshka) and the ground-truth absorption metric."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import saelab

from saelab.analysis.absorption import synthetic_absorption


def test_absorption_by_construction():
    # feature 0 is a parent of feature 1; the SAE's latent 0 = parent direction, latent 1 = child direction
    directions = torch.eye(3)
    parent_of = torch.tensor([-1, 0, -1])
    coeffs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    W_dec = torch.eye(3)
    # parent latent fires alone but is silent whenever the child fires: full absorption
    absorbed = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.4, 0.0], [1.0, 0.0, 1.0], [0.0, 1.4, 0.0]])
    assert synthetic_absorption(absorbed, coeffs, W_dec, directions, parent_of)["absorption"] == 1.0
    # parent latent fires in both cases: none
    clean = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert synthetic_absorption(clean, coeffs, W_dec, directions, parent_of)["absorption"] == 0.0
    half = clean.clone()
    half[3, 0] = 0.0
    assert synthetic_absorption(half, coeffs, W_dec, directions, parent_of)["absorption"] == pytest.approx(
        0.5
    )


def test_compare_recipe_tiny(tmp_path):
    saelab(
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
