"""SCR and TPP (SAEBench) against values worked out by hand on toy cases."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.eval.scr import accuracy, latent_effects, scr_curve, scr_score, top_latents, tpp_score


def test_latent_effects_by_hand():
    # two latents; decoder rows e0 and e1; probe w = (2, -1)
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    w = torch.tensor([2.0, -1.0])
    pos = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 2.0]])  # means 2, 1, 1
    neg = torch.tensor([[0.0, 3.0, 1.0], [0.0, 1.0, 1.0]])  # means 0, 2, 1
    # (μ⁺ − μ⁻) = (2, −1, 0); w · d = (2, −1, 1) → effects (4, 1, 0)
    assert torch.equal(latent_effects(pos, neg, w, W_dec), torch.tensor([4.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="both classes"):
        latent_effects(pos[:0], neg, w, W_dec)


def test_top_latents_abs_and_positive():
    e = torch.tensor([0.5, -3.0, 2.0, -0.1, 2.0])
    assert top_latents(e, 3) == [1, 2, 4]  # |e|, ties by index
    assert top_latents(e, 3, "positive") == [2, 4, 0]
    assert top_latents(torch.tensor([-1.0, 0.0, 0.3]), 3, "positive") == [2]  # never a non-positive one


def test_scr_score_by_hand():
    # base 0.60, oracle 0.90: ablation to 0.75 recovers half the gap; to 0.55 harms
    assert scr_score(0.75, 0.60, 0.90) == pytest.approx(0.5)
    assert scr_score(0.90, 0.60, 0.90) == pytest.approx(1.0)
    assert scr_score(0.55, 0.60, 0.90) == pytest.approx(-1 / 6)
    assert math.isnan(scr_score(0.7, 0.8, 0.8))
    assert scr_curve({2: 0.66, 5: 0.75, 7: 0.8}, 0.6, 0.9) == pytest.approx({2: 0.2, 5: 0.5})


def test_tpp_by_hand():
    clean = {"a": 0.9, "b": 0.8, "c": 0.7}
    ablated = {  # row: whose latents were ablated; column: which probe
        "a": {"a": 0.5, "b": 0.8, "c": 0.6},  # own drop 0.4, others 0.0 and 0.1 → 0.35
        "b": {"a": 0.9, "b": 0.8, "c": 0.7},  # nothing moves → 0
        "c": {"a": 0.7, "b": 0.6, "c": 0.6},  # own 0.1, others 0.2 and 0.2 → −0.1
    }
    total, per = tpp_score(clean, ablated)
    assert per == pytest.approx({"a": 0.35, "b": 0.0, "c": -0.1})
    assert total == pytest.approx(0.25 / 3)
    with pytest.raises(ValueError, match="two or more"):
        tpp_score({"a": 1.0}, {"a": {"a": 1.0}})


def test_accuracy():
    assert accuracy(torch.tensor([1.0, -2.0, 0.5, -0.1]), torch.tensor([1, 0, 0, 0])) == 0.75
