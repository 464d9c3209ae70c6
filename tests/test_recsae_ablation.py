"""Latent ablation: an inactive latent changes nothing; boosting a concept direction raises the concept share."""

from __future__ import annotations

import pytest
import torch

from saelab.analysis.ablation import ablate_latent, concept_item_mask
from saelab.sae import SAE, TopK


def setup():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(41, 8, generator=g)  # 40 items + padding
    attrs = torch.zeros(41, 2, dtype=torch.bool)
    attrs[1:9, 0] = True  # items 1..8 carry the concept
    attrs[20:30, 1] = True
    sae = SAE(8, 16, TopK(3), seed=0).eval()
    with torch.no_grad():
        d = emb[1:9].mean(0)
        sae.W_dec[5] = d / d.norm()  # latent 5 points toward the concept items

    def score(u):
        s = u @ emb.t()
        s[:, 0] = float("-inf")
        return s

    reps = torch.randn(300, 8, generator=g)
    return sae, score, reps, attrs


def test_ablating_an_inactive_latent_changes_nothing():
    sae, score, reps, attrs = setup()
    z = sae.encode(reps)
    j = int((z == 0).sum(0).argmax())
    off = z[:, j] == 0
    assert off.sum() > 50
    items = concept_item_mask(attrs, [0])
    for keep_error in (True, False):
        out = ablate_latent(sae, reps[off], j, score, items, mode="zero", k=5, keep_error=keep_error)
        assert out["n_users"] == int(off.sum())
        assert out["delta"] == 0.0 and out["frac_changed"] == 0.0
        assert out["p_value"] == 1.0 and not out["significant"]
        assert out["share_before"] == out["share_after"]


def test_boosting_a_concept_latent_raises_the_concept_share():
    sae, score, reps, attrs = setup()
    items = concept_item_mask(attrs, [0])
    z = sae.encode(reps)
    off = z[:, 5] == 0
    out = ablate_latent(sae, reps[off], 5, score, items, mode="boost", value=6.0, k=5)
    # brute force: the top-5 of u + (6 − 0)·W_dec[5] against the top-5 of u
    u = reps[off]
    moved = u + 6.0 * sae.W_dec[5].detach()
    before = score(u).topk(5).indices
    after = score(moved).topk(5).indices
    assert out["share_before"] == pytest.approx(items[before].float().mean().item())
    assert out["share_after"] == pytest.approx(items[after].float().mean().item())
    assert out["delta"] > 0.2 and out["p_value"] < 1e-6 and out["significant"]
    # zeroing where it is active moves the other way (or not at all), never toward the concept
    on = z[:, 5] > 0
    if on.sum() >= 2:
        assert ablate_latent(sae, reps[on], 5, score, items, mode="zero", k=5)["delta"] <= 0


def test_bad_arguments_fail_clearly():
    sae, score, reps, attrs = setup()
    items = concept_item_mask(attrs, [0])
    with pytest.raises(ValueError, match="mode"):
        ablate_latent(sae, reps, 0, score, items, mode="scale")
    with pytest.raises(ValueError, match="value"):
        ablate_latent(sae, reps, 0, score, items, mode="boost")
    with pytest.raises(ValueError, match="out of range"):
        ablate_latent(sae, reps, 99, score, items)
