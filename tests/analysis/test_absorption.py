"""Ground-truth feature absorption (`saelab.analysis.absorption`) on hand-built codes."""

from __future__ import annotations

import pytest
import torch

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
