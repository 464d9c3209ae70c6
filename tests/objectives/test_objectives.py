"""Each loss term against a value computed by hand, and the identities between terms."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.objectives import FVU, L0, L1, MSE, AuxK, Matryoshka, NonFiniteLossError, Objective, Ortho, Tilted
from saelab.sae import SAE, JumpReLU, ReLU, TopK
from saelab.types import SAEOutput, TrainState

X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
X_HAT = torch.tensor([[1.0, 0.0], [0.0, 4.0]])  # per-row squared errors: 4 and 9
OUT = SAEOutput(x=X, x_hat=X_HAT, pre_acts=torch.zeros(2, 3))
S0 = TrainState()


def test_mse_by_hand():
    assert MSE()(OUT, None, S0).item() == pytest.approx((4 + 9) / 2)


def test_fvu_by_hand():
    # batch mean (2, 3); total variance about it: 2 + 2 = 4; squared error 13
    assert FVU()(OUT, None, S0).item() == pytest.approx(13 / 4)


def test_tilted_by_hand_and_limits():
    expected = math.log((math.exp(4) + math.exp(9)) / 2)
    assert Tilted(t=1.0)(OUT, None, S0).item() == pytest.approx(expected, rel=1e-6)
    expected_half = 2 * math.log((math.exp(2) + math.exp(4.5)) / 2)
    assert Tilted(t=0.5)(OUT, None, S0).item() == pytest.approx(expected_half, rel=1e-6)
    # t → 0 is ERM (the MSE term), t → ∞ the max
    for t in (0.0, 1e-12, 1e-8):
        assert Tilted(t=t)(OUT, None, S0).item() == pytest.approx(MSE()(OUT, None, S0).item(), rel=1e-6)
    assert Tilted(t=1e9)(OUT, None, S0).item() == pytest.approx(9.0, rel=1e-6)
    assert Tilted(t=-1e9)(OUT, None, S0).item() == pytest.approx(4.0, rel=1e-6)


def test_tilted_gradient_is_softmax_weighted():
    x_hat = X_HAT.clone().requires_grad_(True)
    Tilted(t=1.0)(SAEOutput(x=X, x_hat=x_hat, pre_acts=None), None, S0).backward()
    w = torch.softmax(torch.tensor([4.0, 9.0]), 0)
    expected = -2 * (X - X_HAT) * w[:, None]
    assert torch.allclose(x_hat.grad, expected, atol=1e-6)


def _tiny_sae(W_dec: torch.Tensor) -> SAE:
    sae = SAE(W_dec.shape[1], W_dec.shape[0], ReLU(), normalize_decoder=False)
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
    return sae


def test_l1_by_hand_with_warmup():
    sae = _tiny_sae(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.3, 0.4]]))  # row norms 1, 2, 0.5
    codes = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    out = SAEOutput(x=X, x_hat=X_HAT, pre_acts=codes, dense=codes)
    assert L1()(out, sae, S0).item() == pytest.approx(((1 + 2 * 0.5) + 3 * 2) / 2)
    assert L1(weight_by_decoder_norm=False)(out, sae, S0).item() == pytest.approx(3.0)
    term = L1(coeff=2.0, warmup_steps=10)
    assert term.weight(TrainState(step=4)) == pytest.approx(1.0)
    assert term.weight(TrainState(step=50)) == pytest.approx(2.0)


def test_l0_value_and_threshold_gradient():
    act = JumpReLU(3, threshold_init=0.001, bandwidth=0.001)
    sae = SAE(2, 3, act)
    pre = torch.tensor([[0.5, 0.0008, 2.0]])  # 0.0008 is inside the kernel window around θ = 0.001
    out = SAEOutput(x=torch.zeros(1, 2), x_hat=torch.zeros(1, 2), pre_acts=pre)
    value = L0()(out, sae, S0)
    assert value.item() == 2.0  # H = [1, 0, 1]
    value.backward()
    # ∂H/∂θ = −(1/ε)·K((π−θ)/ε); K = 1 only for latent 1 ((0.0008−0.001)/0.001 = −0.2); ∂/∂logθ = θ·∂/∂θ
    expected = torch.tensor([0.0, -(1 / 0.001) * 0.001, 0.0])
    assert torch.allclose(act.log_threshold.grad, expected, atol=1e-6)


def test_l0_needs_jumprelu():
    sae = SAE(2, 3, TopK(1))
    with pytest.raises(ValueError, match="jumprelu"):
        L0()(sae(torch.randn(4, 2)), sae, S0)


def test_auxk_by_hand():
    torch.manual_seed(0)
    sae = SAE(2, 3, TopK(1), normalize_decoder=False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 2.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    x = torch.tensor([[1.0, 2.0], [2.0, -1.0], [0.5, 0.5]])
    out = sae(x)
    dead = torch.tensor([False, True, True])
    value = AuxK(k_aux=1)(out, sae, TrainState(dead_mask=dead))
    # by hand: residual e = x − x̂; each row's best dead latent (1 or 2) by pre-activation, ReLU'd, decoded
    e = x - out.x_hat.detach()
    pre = x @ sae.W_enc.detach()  # (3, 3)
    e_hat = torch.zeros_like(e)
    for b in range(3):
        j = 1 if pre[b, 1] >= pre[b, 2] else 2
        e_hat[b] = max(pre[b, j].item(), 0.0) * sae.W_dec.detach()[j]
    expected = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    assert sae.W_enc.grad[:, 0].abs().sum() == 0  # a live latent gets no AuxK gradient
    assert AuxK()(out, sae, TrainState(dead_mask=torch.zeros(3, dtype=torch.bool))).item() == 0.0


@pytest.mark.parametrize("bf16", [False, True])
def test_auxk_dense_and_sparse_decodes_agree(bf16):
    """Over many dead latents AuxK decodes sparsely, over few densely (the codes fill most of the block):
    the same loss and gradients either way, in fp32 and under bf16 autocast."""
    d_in, d_sae, batch = 24, 300, 40
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(4))
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[::3] = True  # 100 dead latents, k_aux = 20: a fifth of the block
    results = []
    for fill in (1, 16):  # sparse (20 < 100), dense (320 >= 100)
        sae = SAE(d_in, d_sae, TopK(4), seed=2)
        term = AuxK(k_aux=20)
        term.DENSE_FILL = fill
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = sae(x)
            value = term(out, sae, TrainState(dead_mask=dead))
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in sae.parameters()]))
    (v_sparse, g_sparse), (v_dense, g_dense) = results
    assert float(v_sparse) > 0
    torch.testing.assert_close(v_dense, v_sparse, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_dense, g_sparse, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ortho_by_hand():
    r = 1 / math.sqrt(2)
    sae = _tiny_sae(torch.tensor([[1.0, 0.0], [0.0, 1.0], [r, r], [-1.0, 0.0]]))
    # max off-diagonal cosines: 0.707, 0.707, 0.707, 0 → squares 0.5, 0.5, 0.5, 0
    assert Ortho(chunk_size=4)(None, sae, S0).item() == pytest.approx(0.375, abs=1e-6)
    assert Ortho(chunk_size=4, absolute=True)(None, sae, S0).item() == pytest.approx(0.75, abs=1e-6)
    every5 = Ortho(chunk_size=4, every_n_steps=5)
    assert every5(None, sae, TrainState(step=3)).item() == 0.0
    assert every5(None, sae, TrainState(step=10)).item() == pytest.approx(5 * 0.375, abs=1e-5)


def test_ortho_chunks_follow_the_step_permutation():
    torch.manual_seed(1)
    W = torch.randn(8, 3)
    sae = _tiny_sae(W)
    state = TrainState(step=7, seed=3)
    value = Ortho(chunk_size=4)(None, sae, state).item()
    perm = torch.randperm(8, generator=state.generator("cpu", salt=17))
    Wn = W / W.norm(dim=1, keepdim=True)
    terms = []
    for idx in perm.chunk(2):
        C = Wn[idx] @ Wn[idx].t()
        C.fill_diagonal_(-float("inf"))
        terms.append(C.max(1).values.pow(2).mean())
    assert value == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_matryoshka_by_hand():
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    sae = _tiny_sae(W_dec)
    with torch.no_grad():
        sae.b_dec.copy_(torch.tensor([0.5, 0.5]))
    codes = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    x = torch.tensor([[1.0, 3.0], [4.0, 4.0]])
    out = SAEOutput(x=x, x_hat=sae.decode(codes), pre_acts=codes, dense=codes)
    # prefix 1: x̂ = b_dec + f0·W0 → rows (1.5, .5), (.5, .5); errors (.25 + 6.25), (12.25 + 12.25)
    p1 = ((0.25 + 6.25) + (12.25 + 12.25)) / 2
    # prefix 3 (full): rows (1.5, 2.5), (3.5, 4.5); errors (.25 + .25), (.25 + .25)
    p3 = (0.5 + 0.5) / 2
    assert Matryoshka(groups=[1, 2])(out, sae, S0).item() == pytest.approx((p1 + p3) / 2)
    assert Matryoshka(groups=[3])(out, sae, S0).item() == pytest.approx(MSE()(out, sae, S0).item())


def test_matryoshka_single_group_equals_mse_on_sparse_path():
    torch.manual_seed(0)
    sae = SAE(8, 32, TopK(4))
    out = sae(torch.randn(16, 8))
    mse = MSE()(out, sae, S0).item()
    assert Matryoshka(groups=[32])(out, sae, S0).item() == pytest.approx(mse, rel=1e-6)
    assert Matryoshka(group_fractions=[1.0])(out, sae, S0).item() == pytest.approx(mse, rel=1e-6)
    # the sparse path's prefix losses equal the dense computation on the same codes
    dense = SAEOutput(x=out.x, x_hat=out.x_hat, pre_acts=out.pre_acts, dense=out.codes.detach())
    m = Matryoshka(groups=[4, 12, 16])
    assert m(out, sae, S0).item() == pytest.approx(m(dense, sae, S0).item(), rel=1e-5)


def test_matryoshka_random_prefixes_are_reproducible_and_valid():
    m = Matryoshka(random_prefixes=5)
    a, b = m.prefixes(1000, TrainState(step=3)), m.prefixes(1000, TrainState(step=3))
    assert a == b and a[-1] == 1000 and a == sorted(set(a)) and len(a) == 5
    # the truncated Pareto favours short prefixes
    lens = [p for s in range(200) for p in m.prefixes(1000, TrainState(step=s))[:-1]]
    assert sorted(lens)[len(lens) // 2] < 200


def test_objective_sums_weighted_terms_and_rejects_nan():
    obj = Objective({"mse": MSE(coeff=2.0), "fvu": FVU(coeff=0.5)})
    total, logs = obj(OUT, None, S0)
    assert total.item() == pytest.approx(2 * 6.5 + 0.5 * 3.25)
    assert set(logs) == {"loss/mse", "loss/fvu", "loss/total"}
    bad = SAEOutput(x=X, x_hat=torch.full_like(X, float("nan")), pre_acts=None)
    with pytest.raises(NonFiniteLossError, match="loss/mse"):
        obj(bad, None, S0)
    with pytest.raises(ValueError, match="no terms"):
        Objective({})
