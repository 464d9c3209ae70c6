"""SAE variants: activation semantics, STE gradients, init and decoder constraints, residual SAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from saelab.sae import SAE, BatchTopK, JumpReLU, ReLU, ResidualSAE, TopK, geometric_median


def _positive_sae(act, d_in=8, d_sae=32) -> SAE:
    sae = SAE(d_in, d_sae, act, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive, so selection sizes are exact
    return sae


def test_topk_has_exactly_k_nonzeros():
    sae = _positive_sae(TopK(5))
    out = sae(torch.randn(64, 8))
    assert (out.codes != 0).sum(-1).tolist() == [5] * 64
    assert out.l0.tolist() == [5.0] * 64
    # the k kept entries are the k largest pre-activations of each row
    top = out.pre_acts.topk(5, dim=-1).indices.sort(-1).values
    kept = (out.codes != 0).nonzero()[:, 1].reshape(64, 5).sort(-1).values
    assert torch.equal(top, kept)


def test_batchtopk_averages_k_and_thresholds_at_eval():
    sae = _positive_sae(BatchTopK(4))
    x = torch.randn(50, 8)
    out = sae.train()(x)
    per_row = (out.codes != 0).sum(-1).float()
    assert per_row.sum().item() == 4 * 50 and per_row.std() > 0  # mean k, variable per row
    assert float(sae.activation.threshold) > 0
    sae.eval()
    full, one = sae(x), sae(x[:3])
    assert torch.allclose(full.x_hat[:3], one.x_hat, atol=1e-6)  # no batch dependence at inference
    th = sae.activation.threshold
    assert torch.equal(full.codes != 0, full.pre_acts > th)


def test_batchtopk_threshold_is_ema_of_min_selected():
    act = BatchTopK(2, threshold_momentum=0.5)
    pre1 = torch.tensor([[5.0, 1.0, 0.0], [4.0, 3.0, 2.0]])  # top 4: 5, 4, 3, 2 → min 2
    act.select(pre1)
    assert float(act.threshold) == pytest.approx(2.0)
    pre2 = torch.tensor([[9.0, 8.0, 0.0], [7.0, 6.0, 1.0]])  # min selected 6 → 0.5·2 + 0.5·6
    act.select(pre2)
    assert float(act.threshold) == pytest.approx(4.0)


def test_jumprelu_threshold_gradient_matches_pseudo_derivative():
    eps, theta = 0.01, 0.1
    act = JumpReLU(4, threshold_init=theta, bandwidth=eps)
    pre = torch.tensor([[0.097, 0.5, 0.104, 0.02], [0.103, 0.0, 0.096, 0.2]], requires_grad=True)
    out = act(pre)
    assert torch.equal(out.detach(), pre.detach() * (pre.detach() > theta))
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    (out * g).sum().backward()
    # ∂JumpReLU/∂θ := −(θ/ε)·K((π−θ)/ε), K(u) = 1[|u| < ½]; chain rule to log θ multiplies by θ
    u = (pre.detach() - theta) / eps
    d_theta = (-(theta / eps) * (u.abs() < 0.5).float() * g).sum(0)
    assert torch.allclose(act.log_threshold.grad, d_theta * theta, atol=1e-5)
    assert torch.equal(pre.grad, g * (pre.detach() > theta))  # ordinary gradient where the unit is on


def test_geometric_median_matches_numerical_minimiser():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(60, 3)) + np.array([0, 0, 20.0]) * (rng.random((60, 1)) < 0.2)
    ours = geometric_median(torch.tensor(pts, dtype=torch.float32)).numpy()
    ref = minimize(
        lambda y: np.linalg.norm(pts - y, axis=1).sum(),
        pts.mean(0),
        method="Nelder-Mead",
        options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 20000},
    ).x
    assert np.allclose(ours, ref, atol=1e-3)
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert torch.allclose(geometric_median(square), torch.tensor([0.5, 0.5]), atol=1e-5)


def test_init_and_decoder_constraints():
    sae = SAE(6, 20, ReLU(), seed=3)
    assert torch.equal(sae.W_enc, sae.W_dec.t())  # W_enc = W_decᵀ
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(20))
    x = torch.randn(32, 6) + 3
    sae.init_b_dec(x)
    assert torch.allclose(sae.b_dec, geometric_median(x), atol=1e-5)
    before = sae.b_dec.clone()
    sae.init_b_dec(x * 5)  # only once
    assert torch.equal(sae.b_dec, before)
    out = sae(x)
    (out.x_hat - x).pow(2).sum().backward()
    sae.remove_parallel_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-4
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.set_decoder_norm_to_unit()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(20), atol=1e-6)


def test_parallel_gradient_removal_is_the_projection_on_rows_of_any_norm():
    sae = SAE(6, 20, ReLU(), seed=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(20, 1, generator=g) * 3 + 0.2)  # rows off unit norm
    grad = torch.randn(20, 6, generator=g)
    sae.W_dec.grad = grad.clone()
    sae.remove_parallel_decoder_grad()
    W, G = sae.W_dec.detach().double(), grad.double()
    want = G - (G * W).sum(1, keepdim=True) / (W * W).sum(1, keepdim=True) * W  # g − ⟨g, w⟩ w / ‖w‖²
    torch.testing.assert_close(sae.W_dec.grad.double(), want, rtol=1e-5, atol=1e-6)


def test_shape_and_argument_errors():
    sae = SAE(8, 16, TopK(2))
    with pytest.raises(ValueError, match="d_in=8"):
        sae(torch.randn(4, 5))
    with pytest.raises(ValueError, match="d_in"):
        SAE(None, 16, ReLU())
    with pytest.raises(ValueError, match="exceeds d_sae"):
        SAE(8, 4, TopK(5))(torch.randn(2, 8))


def test_residual_sae_sums_base_and_residual():
    torch.manual_seed(0)
    base = SAE(8, 32, TopK(4), seed=1)
    res = SAE(8, 16, TopK(2), apply_b_dec_to_input=False, b_dec_init="zeros", seed=2)
    boosted = ResidualSAE(base, res)
    x = torch.randn(10, 8)
    out = boosted(x)
    assert torch.allclose(out.x_hat, base(x).x_hat + res(x).x_hat, atol=1e-6)
    (out.x_hat - x).pow(2).sum().backward()
    assert all(p.grad is None for p in base.parameters())  # frozen
    assert res.W_enc.grad is not None and res.b_dec.grad is None and res.b_dec.abs().sum() == 0
    trainable = [n for n, p in boosted.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("residual.") for n in trainable)
