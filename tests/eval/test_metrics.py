"""Streaming metrics against direct computations on the concatenated data."""

from __future__ import annotations

import pytest
import torch

from saelab.data.synthetic import SyntheticFeatures
from saelab.eval.base import evaluate
from saelab.eval.core import Core
from saelab.eval.metrics import FVU, L0, DeadFraction, ExplainedVariance, FeatureRecovery, MeanMaxCosine
from saelab.eval.synthetic import Recovery
from saelab.sae import SAE, TopK


def test_explained_variance_streams_over_the_whole_set():
    torch.manual_seed(0)
    xs = [torch.randn(7, 5) * (i + 1) + i for i in range(4)]
    hs = [x + 0.3 * torch.randn_like(x) for x in xs]
    ev, fvu = ExplainedVariance(5), FVU(5)
    for x, h in zip(xs, hs):
        ev.update(x, h)
        fvu.update(x, h)
    X, H = torch.cat(xs).double(), torch.cat(hs).double()
    expected = 1 - ((X - H) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    assert ev.compute().item() == pytest.approx(expected.item(), rel=1e-9)
    assert fvu.compute().item() == pytest.approx(1 - expected.item(), rel=1e-9)


def test_l0_and_dead_fraction():
    codes = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0], [0.0, 5.0, 0.0, 0.0]])
    l0, dead = L0(), DeadFraction(4)
    for row in codes.split(1):
        l0.update((row != 0).sum(-1).float())
        dead.update((row != 0).sum(0), 1)
    assert l0.compute().item() == pytest.approx(4 / 3)
    assert dead.compute().item() == pytest.approx(0.5)  # latents 0 and 2 never fire
    assert dead.density().tolist() == pytest.approx([0, 2 / 3, 0, 2 / 3])


def test_mean_max_cosine_and_recovery_by_brute_force():
    torch.manual_seed(0)
    W = torch.randn(12, 4)
    m = MeanMaxCosine()
    m.update(W)
    Wn = W / W.norm(dim=1, keepdim=True)
    best = [max(float(Wn[i] @ Wn[j]) for j in range(12) if j != i) for i in range(12)]
    assert m.compute().item() == pytest.approx(sum(best) / 12, rel=1e-5)
    truth = torch.randn(5, 4)
    rec = FeatureRecovery(truth)
    rec.update(torch.cat([truth[:3] * 2.0, torch.randn(6, 4)]))  # 3 of 5 features present exactly
    assert rec.recovered(0.999) >= 0.6
    assert rec.scores[:3].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def test_evaluate_a_perfect_sae_on_synthetic_truth(tmp_path):
    feats = SyntheticFeatures(d_in=16, n_features=12, mean_active=2.0, n_parents=2, children_per_parent=2)
    sae = SAE(16, 12, TopK(12), apply_b_dec_to_input=False, normalize_decoder=False, b_dec_init="zeros")
    with torch.no_grad():  # a dictionary equal to the true features, with an exact (pseudo-inverse) encoder
        sae.W_dec.copy_(feats.directions)
        sae.W_enc.copy_(torch.linalg.pinv(feats.directions))
        sae.b_enc.zero_()
    feats_big = SyntheticFeatures(d_in=16, n_features=12, mean_active=2.0, n_parents=2, children_per_parent=2)
    batches = [{"acts": feats_big.sample(256, i)[0]} for i in range(3)]

    class Source:
        true_features = feats.directions

        def val_dataloader(self):
            return batches

    res = evaluate(sae, Source(), [Core(plot=False), Recovery(plot=False)], tmp_path).metrics
    assert res["feature_recovery"] == pytest.approx(1.0, abs=1e-5) and res["frac_recovered"] == 1.0
    assert res["explained_variance"] > 0.99 and res["n_tokens"] == 768


def test_synthetic_truth_is_independent_of_sae_init():
    from saelab.data.synthetic import SyntheticFeatures
    from saelab.eval.metrics import max_cosine

    feats = SyntheticFeatures(d_in=32, n_features=64, n_parents=2, children_per_parent=2, seed=0)
    sae = SAE(32, 64, TopK(4), seed=0)
    # an untrained SAE must not start at the answer (same seed, same shapes)
    assert max_cosine(feats.directions, sae.W_dec).mean() < 0.8
