"""Screened TopK (`saelab.kernels.screened_topk`): the fp32 top-k found from a bf16 product and certified row
by row. Every expectation is computed independently: the plain fp32 product and `torch.topk`, and a float64
product for the rounding bound."""

from __future__ import annotations

import pytest
import torch

from saelab.kernels import (
    _U,
    SCREEN_MIN_WEIGHTS,
    ScreenStats,
    fast_bf16,
    screen_applies,
    screen_candidates,
    screened_topk,
    top_candidates,
    topk_indices,
)
from saelab.sae import SAE
from saelab.sae.activations import TopK


def _problem(batch: int, d_in: int, d_sae: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, d_in, generator=g) * scale + 0.5) * torch.rand(batch, 1, generator=g).add(0.2)
    W = torch.randn(d_in, d_sae, generator=g) / d_in**0.5 * torch.rand(1, d_sae, generator=g).add(0.5)
    b = torch.randn(d_sae, generator=g) * 0.3
    return x, W, b


def _fp32_topk(x, W, b, k):
    pre = torch.addmm(b, x, W)
    cols = pre.topk(k, dim=-1).indices.sort(dim=-1).values
    return cols, pre.gather(-1, cols)


@pytest.mark.parametrize(
    ("batch", "d_in", "d_sae", "k", "seed"),
    [(64, 48, 512, 8, 0), (200, 96, 2048, 16, 1), (33, 130, 1000, 5, 2)],
)
def test_screened_selection_is_the_fp32_topk(batch, d_in, d_sae, k, seed):
    x, W, b = _problem(batch, d_in, d_sae, seed)
    ScreenStats.reset()
    cols, vals, pre = screened_topk(x, W, b, k)
    want_cols, want_vals = _fp32_topk(x, W, b, k)
    assert torch.equal(cols, want_cols)
    torch.testing.assert_close(vals, want_vals, rtol=1e-5, atol=1e-5)
    assert pre.dtype == torch.bfloat16 and pre.shape == (batch, d_sae)
    assert ScreenStats.rows == batch
    assert ScreenStats.fallback < batch  # Gaussian-like rows are nearly all certified


def test_rows_that_cannot_be_certified_are_recomputed_in_fp32():
    # every latent nearly the same direction: all π of a row lie within the bf16 rounding of each other, so
    # no row can be certified from the bf16 product; the fp32 fallback must still give the fp32 top-k
    g = torch.Generator().manual_seed(5)
    batch, d_in, d_sae, k = 40, 64, 600, 6
    w0 = torch.randn(d_in, 1, generator=g)
    W = w0 + 1e-3 * torch.randn(d_in, d_sae, generator=g)
    x = torch.randn(batch, d_in, generator=g)
    b = torch.zeros(d_sae)
    ScreenStats.reset()
    cols, vals, _ = screened_topk(x, W, b, k)
    assert ScreenStats.fallback == batch
    want_cols, want_vals = _fp32_topk(x, W, b, k)
    assert torch.equal(cols, want_cols)
    torch.testing.assert_close(vals, want_vals, rtol=0, atol=0)


def test_a_wider_second_pass_certifies_rows_whose_near_ties_outnumber_the_candidates():
    """60 near-duplicate latents stand far above the other 1940: with c = 3k + 8 = 20 candidates every row's
    k-th and (c+1)-th values are near-equal, so no row certifies; the second pass (16c candidates) reaches
    below the cluster, certifies every row, and none needs the full fp32 product."""
    g = torch.Generator().manual_seed(9)
    batch, d_in, d_sae, k = 24, 64, 2000, 4
    w0 = torch.randn(d_in, 1, generator=g)
    W = 0.05 * torch.randn(d_in, d_sae, generator=g)
    W[:, :60] = w0 + 1e-3 * torch.randn(d_in, 60, generator=g)
    x = w0.t() + 0.1 * torch.randn(batch, d_in, generator=g)
    b = torch.zeros(d_sae)
    ScreenStats.reset()
    cols, vals, _ = screened_topk(x, W, b, k)
    assert ScreenStats.retried == batch and ScreenStats.fallback == 0
    want_cols, want_vals = _fp32_topk(x, W, b, k)
    assert torch.equal(cols, want_cols)
    torch.testing.assert_close(vals, want_vals, rtol=1e-5, atol=1e-5)


def test_a_non_finite_row_falls_back_instead_of_being_certified():
    x, W, b = _problem(16, 32, 400, seed=3)
    x[4, 7] = float("nan")
    ScreenStats.reset()
    cols, _, _ = screened_topk(x, W, b, 4)
    assert ScreenStats.fallback >= 1
    want_cols, _ = _fp32_topk(x, W, b, 4)
    ok = torch.arange(16) != 4
    assert torch.equal(cols[ok], want_cols[ok])


@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_the_bf16_rounding_bound_holds_for_every_entry(scale):
    """The certificate's premise, checked against a float64 product on this machine's bf16 kernel: every
    computed π̃ is within 2.02u(|π̃| + max|b|) + (2u + u² + γ(1 + u)²)‖x‖ max‖W_j‖ of the exact π."""
    x, W, b = _problem(256, 200, 3000, seed=7, scale=scale)
    x[::7] *= 30.0  # rows of very different norms
    pre = torch.addmm(b.bfloat16(), x.bfloat16(), W.bfloat16()).double()
    exact = x.double() @ W.double() + b.double()
    d = x.shape[1]
    gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
    slack = (
        (2 * _U + _U * _U + gamma * (1 + _U) ** 2)
        * x.double().norm(dim=1, keepdim=True)
        * W.double().norm(dim=0).max()
    )
    bound = 2.02 * _U * (pre.abs() + b.double().abs().max()) + slack
    err = (pre - exact).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    assert float((err / bound).max()) > 1e-3  # the bound is not vacuous against the actual error


def test_screened_sae_trains_like_the_unscreened_one():
    """Same weights and batch: the same latents, x̂ and gradients to fp32 rounding, screened or not."""
    d_in, d_sae, k, batch = 64, 1024, 8, 96
    a = SAE(d_in, d_sae, TopK(k, screen=False), b_dec_init="zeros", seed=1)
    b = SAE(d_in, d_sae, TopK(k, screen=True), b_dec_init="zeros", seed=1)
    g = torch.Generator().manual_seed(2)
    bias, shift = torch.randn(d_sae, generator=g) * 0.1, torch.randn(d_in, generator=g) * 0.3
    for m in (a, b):
        with torch.no_grad():
            m.b_enc.copy_(bias)
            m.b_dec.copy_(shift)
    x = torch.randn(batch, d_in, generator=g) * 2 + 1
    ScreenStats.reset()
    oa, ob = a(x), b(x)
    assert ScreenStats.rows == batch  # b screened, a did not
    assert ob.pre_acts.dtype == torch.bfloat16 and oa.pre_acts.dtype == torch.float32
    assert torch.equal(oa.sparse.rows, ob.sparse.rows) and torch.equal(oa.sparse.cols, ob.sparse.cols)
    torch.testing.assert_close(ob.x_hat, oa.x_hat, rtol=1e-5, atol=1e-5)
    (oa.x - oa.x_hat).pow(2).sum().backward()
    (ob.x - ob.x_hat).pow(2).sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert float((pb.grad - pa.grad).abs().max()) <= 1e-5 * float(pa.grad.abs().max()), name


def test_when_screening_applies():
    k = 8
    small, large = torch.zeros(64, 1024), torch.zeros(64, SCREEN_MIN_WEIGHTS // 64)
    assert not screen_applies(False, large, k)
    assert screen_applies(True, small, k)
    assert not screen_applies(None, small, k)  # auto: too small an encoder to gain
    assert screen_applies(None, large, k) == fast_bf16(large.device)
    assert not screen_applies(True, large.double(), k)  # fp32 weights only
    assert not screen_applies(True, torch.zeros(64, screen_candidates(k)), k)  # candidates would fill the row
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not screen_applies(True, large, k)  # bf16-mixed selects on its bf16 π by request


def test_bf16_mixed_is_not_screened():
    sae = SAE(32, 600, TopK(4, screen=True), b_dec_init="zeros", seed=0)
    ScreenStats.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sae(torch.randn(8, 32))
    assert ScreenStats.rows == 0


def test_topk_rejects_a_screen_that_is_not_a_switch():
    with pytest.raises(ValueError, match="screen must be true, false or null"):
        TopK(4, screen="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(("n", "c"), [(8192, 48), (16384, 105), (4096, 20), (1000, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_top_candidates_are_the_rows_largest_entries(n, c, dtype):
    """Against torch.topk: the same multiset of values per row (ties at the c-th value make which entry is
    taken unspecified in both), and each index points at its value. Coarse values make ties common; the
    rows with fewer than c non-negative entries are the ones the bit-pattern order cannot rank."""
    g = torch.Generator().manual_seed(n + c)
    v = (torch.randn(64, n, generator=g) * 4).round().to(dtype)
    v[3] = 1.0  # a row of equal values
    v[5, ::3] = 100.0  # more maxima than c
    v[7] = -v[7].abs() - 1  # all negative
    v[9] = -v[9].abs() - 1
    v[9, 7 : 7 + c // 2] = 3.0  # fewer than c non-negative entries
    v[11, 10] = float("inf")
    v[13] = -v[13].abs()  # -0.0 and negatives ...
    v[13, 1::2] = 0.0  # ... beside +0.0: equal values of either sign
    v[15, -c:] = -0.0  # the c-th largest is a signed zero
    vals, idx = top_candidates(v, c)
    want = v.topk(c, dim=-1).values
    assert torch.equal(vals.float().sort(-1).values, want.float().sort(-1).values)
    assert torch.equal(v.gather(1, idx), vals)
    assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all())  # distinct columns


def test_top_candidates_rank_nan_first_like_topk():
    """A NaN (sign bit clear, as float('nan') is) is taken first, as torch.topk takes it."""
    v = torch.randn(4, 8192, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    v[1, 4000] = float("nan")
    vals, idx = top_candidates(v, 20)
    assert int(torch.isnan(vals[1]).sum()) == 1 and 4000 in idx[1].tolist()
    assert not bool(torch.isnan(vals[[0, 2, 3]]).any())


def test_topk_indices_on_wide_rows_keeps_lowest_index_ties():
    """`topk_indices` over rows wide enough for the striped candidates: still the lowest-indexed of equal
    values, exactly k per row (against a stable sort in float64)."""
    g = torch.Generator().manual_seed(11)
    cases = [
        torch.randn(32, 8192, generator=g).to(torch.bfloat16),
        (torch.randn(16, 16384, generator=g) * 2)
        .round()
        .to(torch.bfloat16),  # tie groups past the candidates
    ]
    for v in cases:
        for k in (1, 8, 32):
            want = torch.sort(v.double(), dim=-1, descending=True, stable=True).indices[:, :k].sort(-1).values
            assert torch.equal(topk_indices(v, k), want)


def test_auto_screening_stops_while_it_does_not_pay_and_looks_again(monkeypatch):
    """`screen=None`: screened while few rows need the second pass. On batches where every row does (60
    near-duplicate latents far above the rest) it stops after the first such call, screens one call in
    `probe_every` to look again, and the average share falls back as probes find easy rows. The selection
    is the fp32 top-k throughout, screened or not."""
    g = torch.Generator().manual_seed(9)
    d_in, d_sae, k, batch = 64, 2000, 4, 24
    sae = SAE(d_in, d_sae, TopK(k, screen=None), b_dec_init="zeros", seed=0, normalize_decoder=False)
    w0 = torch.randn(d_in, 1, generator=g)
    w0 /= w0.norm()
    with torch.no_grad():
        sae.W_enc.copy_(0.1 * torch.randn(d_in, d_sae, generator=g))
        sae.W_enc[:, :60] = w0 + 1e-3 * torch.randn(d_in, 60, generator=g)
        sae.b_enc.zero_()
    hard = 3 * w0.t() + 0.1 * torch.randn(batch, d_in, generator=g)  # every row's top 4 among the 60
    easy = -3 * w0.t() + 0.3 * torch.randn(batch, d_in, generator=g)  # the 60 far below: clear margins
    policy = sae.activation.screen_policy
    policy.probe_every = 5
    # as on a CPU with fast bf16 products and an encoder large enough for auto to screen
    monkeypatch.setattr("saelab.sae.model.screen_applies", lambda screen, W, k: True)
    screened = []
    for x in [easy, hard] + [hard] * 5 + [easy] * 6:
        before = ScreenStats.rows
        out = sae(x)
        screened.append(ScreenStats.rows > before)
        want = torch.topk(x @ sae.W_enc + sae.b_enc, k, dim=-1).indices.sort(-1).values
        assert torch.equal(out.sparse.cols.view(batch, k), want)
    # easy, hard (screened: share 0 -> 0.5) | 4 calls off, the 5th probes on hard rows (0.75) | 4 off, the
    # probe on easy rows (0.375) | still above 5%: off
    assert screened == [True, True] + [False] * 4 + [True] + [False] * 4 + [True, False]
    assert policy.retried_share == pytest.approx(0.375)
