"""The sparse TopK/BatchTopK path (saelab.kernels) against a dense reference and against sparsify.

The reference is written independently: dense π, a dense TopK/BatchTopK mask from torch.topk, dense
codes, dense matmuls, and autograd through all of it.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from saelab import kernels
from saelab.kernels import SparseLayout, sparse_decode
from saelab.sae import SAE
from saelab.sae.activations import BatchTopK, TopK

D_IN, D_SAE, K, BATCH = 24, 96, 6, 20


def make_sae(act, dtype="float64", apply_b_dec=True, seed=0, dead_bias=True) -> SAE:
    sae = SAE(D_IN, D_SAE, act, apply_b_dec_to_input=apply_b_dec, b_dec_init="zeros", seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.3)
        b = torch.randn(D_SAE, generator=g) * 0.2
        if dead_bias:  # all but 10 latents strongly negative: some rows then have fewer than k positive π
            b[: D_SAE - 10] -= 3.0
        sae.b_enc.copy_(b)
    return sae


def dense_reference(sae: SAE, x: torch.Tensor, batch_topk: bool):
    """(codes, x_hat) computed densely: π, a mask from torch.topk, ReLU, dense matmuls."""
    x_in = x - sae.b_dec if sae.apply_b_dec_to_input else x
    pre = x_in @ sae.W_enc + sae.b_enc
    mask = torch.zeros_like(pre, dtype=torch.bool)
    with torch.no_grad():
        if batch_topk:
            flat = pre.reshape(-1).topk(sae.activation.k * pre.shape[0]).indices
            mask.view(-1)[flat] = True
        else:
            mask.scatter_(1, pre.topk(sae.activation.k, dim=1).indices, True)
    codes = torch.where(mask, pre.relu(), torch.zeros_like(pre))
    return codes, codes @ sae.W_dec + sae.b_dec


def losses(codes, x_hat, target, weights):
    """Reconstruction error plus a weighted code sum, so gradient reaches the codes both ways."""
    return (x_hat - target).pow(2).sum() + (codes * weights).sum()


@pytest.mark.parametrize("batch_topk", [False, True], ids=["topk", "batchtopk"])
@pytest.mark.parametrize("x_grad", [False, True], ids=["x-data", "x-grad"])
@pytest.mark.parametrize("apply_b_dec", [True, False], ids=["bdec-in", "no-bdec-in"])
def test_forward_and_all_grads_match_dense(batch_topk, x_grad, apply_b_dec):
    act = BatchTopK(K) if batch_topk else TopK(K)
    sae = make_sae(act, apply_b_dec=apply_b_dec)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(BATCH, D_IN, generator=g, dtype=torch.float64) * 0.5).requires_grad_(x_grad)
    target = torch.randn(BATCH, D_IN, generator=g, dtype=torch.float64)
    weights = torch.randn(BATCH, D_SAE, generator=g, dtype=torch.float64)

    out = sae(x)
    ref_codes, ref_x_hat = dense_reference(sae, x, batch_topk)
    positive = (ref_codes > 0).sum(1)
    if not batch_topk:
        assert bool((positive < K).any()), "the test must include rows with fewer than k positive values"
    torch.testing.assert_close(out.x_hat, ref_x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.codes, ref_codes, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.l0, positive.to(out.l0.dtype))

    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec] + ([x] if x_grad else [])
    got = torch.autograd.grad(losses(out.codes, out.x_hat, target, weights), params)
    want = torch.autograd.grad(losses(ref_codes, ref_x_hat, target, weights), params)
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec", "x"], got, want, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")
        assert a.stride() == b.stride() or not a.is_contiguous(), name


def test_float32_grads_match_dense_and_keep_param_layout():
    sae = make_sae(TopK(K), dtype="float32")
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(3)) * 0.5
    out = sae(x)
    (out.x_hat - x).pow(2).sum().backward()
    got = [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    for p in sae.parameters():
        p.grad = None
    _, ref_x_hat = dense_reference(sae, x, batch_topk=False)
    (ref_x_hat - x).pow(2).sum().backward()
    for a, p in zip(got, (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-5)
        assert a.stride() == p.stride()  # the gradient comes back in the parameter's own memory layout


def test_bfloat16_path_runs_and_agrees_with_float32():
    sae32 = make_sae(TopK(K), dtype="float32")
    sae16 = make_sae(TopK(K), dtype="bfloat16")
    with torch.no_grad():
        for p32, p16 in zip(sae32.parameters(), sae16.parameters(), strict=True):
            p32.copy_(p16.float())  # same (bf16-representable) weights
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(4)) * 0.5
    grads = []
    for sae in (sae32, sae16):
        out = sae(x.to(sae.W_enc.dtype))
        (out.x_hat.float() - x).pow(2).sum().backward()
        grads.append([p.grad for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)])
    for g32, g16 in zip(*grads, strict=True):
        assert g16.dtype == torch.bfloat16 and torch.isfinite(g16.float()).all()
        assert (g16.float() - g32).norm() <= 0.05 * g32.norm() + 1e-3


def test_layout_rows_sorted_and_cols_sorted_within_rows():
    sae = make_sae(TopK(K), dead_bias=False)
    out = sae(torch.randn(BATCH, D_IN, dtype=torch.float64))
    sp = out.sparse
    key = sp.rows * D_SAE + sp.cols
    assert bool((key[1:] > key[:-1]).all())
    assert sp.offsets.tolist() == [K * i for i in range(BATCH)]
    assert sp.nnz == K * BATCH


def test_batchtopk_inference_with_empty_selection():
    act = BatchTopK(K)
    sae = make_sae(act)
    sae.train()
    sae(torch.randn(BATCH, D_IN, dtype=torch.float64))  # sets the threshold
    act.threshold.fill_(1e9)  # nothing passes
    sae.eval()
    x = torch.randn(BATCH, D_IN, dtype=torch.float64)
    out = sae(x)
    assert out.sparse.nnz == 0
    torch.testing.assert_close(out.x_hat, sae.b_dec.expand(BATCH, D_IN))
    (out.x_hat - x).pow(2).sum().backward()
    assert float(sae.W_enc.grad.abs().sum()) == 0.0 and float(sae.W_dec.grad.abs().sum()) == 0.0
    torch.testing.assert_close(sae.b_dec.grad, 2 * (sae.b_dec - x).sum(0))


def test_sparse_decode_standalone_matches_dense():
    g = torch.Generator().manual_seed(5)
    W_dec = torch.randn(D_SAE, D_IN, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0, 0, 1, 3, 3, 3])  # row 2 is empty
    cols = torch.tensor([5, 2, 7, 1, 9, 4])  # unsorted within rows
    vals = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    out = sparse_decode(rows, cols, vals, W_dec, batch=4)
    dense = torch.zeros(4, D_SAE, dtype=torch.float64).index_put((rows, cols), vals)
    ref = dense @ W_dec
    torch.testing.assert_close(out, ref)
    go = torch.randn(4, D_IN, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        torch.autograd.grad(out, [vals, W_dec], go), torch.autograd.grad(ref, [vals, W_dec], go)
    )


def test_layout_transpose_products():
    rows = torch.tensor([0, 0, 1, 2, 2])
    cols = torch.tensor([1, 3, 0, 3, 1])
    lay, perm = SparseLayout.from_selection(rows, cols, batch=3, d_sae=4)
    assert lay.cols.tolist() == [1, 3, 0, 1, 3] and perm is not None
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    dense = torch.zeros(3, 4, dtype=torch.float64).index_put((lay.rows, lay.cols), vals)
    m = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(lay.t_matmul(vals, m), dense.t() @ m)
    w = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(lay.sampled(m, w), (m @ w.t())[lay.rows, lay.cols])
    torch.testing.assert_close(lay.colsum(vals), dense.sum(0))


def test_sampled_by_column_equals_by_row():
    """`sampled` runs over the transposed pattern: the same dot products in the same order as the SDDMM
    at the row-sorted pattern, so equal to it, not just close."""
    g = torch.Generator().manual_seed(3)
    batch, d_sae, n, k = 64, 512, 48, 7
    cols = torch.rand(batch, d_sae, generator=g).topk(k, dim=-1).indices.sort(dim=-1).values
    lay = SparseLayout(torch.arange(batch).repeat_interleave(k), cols.reshape(-1), batch, d_sae)
    a, b = torch.randn(batch, n, generator=g), torch.randn(d_sae, n, generator=g)
    pattern = lay.csr(torch.zeros(lay.nnz))
    by_row = torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0).values()
    by_col = lay.sampled(a, b)
    assert torch.equal(by_row, by_col)
    torch.testing.assert_close(by_col, (a.double() @ b.double().t())[lay.rows, lay.cols].float())


# ------------------------------------------------------------------------------------------ sparsify parity
def _sparsify():
    with contextlib.redirect_stdout(io.StringIO()):  # it prints which decoder kernel it picked
        return pytest.importorskip("sparsify")


def _pair(sparsify, dead_bias: bool):
    sae = make_sae(TopK(K), dtype="float32", dead_bias=dead_bias)
    sc = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K), dtype=torch.float32)
    with torch.no_grad():
        sc.encoder.weight.copy_(sae.W_enc.t())
        sc.encoder.bias.copy_(sae.b_enc)
        sc.W_dec.copy_(sae.W_dec)
        sc.b_dec.copy_(sae.b_dec)
    return sae, sc


@pytest.mark.parametrize("dead_bias", [False, True], ids=["all-rows-k-positive", "rows-below-k"])
def test_topk_forward_matches_sparsify(dead_bias):
    sparsify = _sparsify()
    sae, sc = _pair(sparsify, dead_bias)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(6))
    ours, theirs = sae(x), sc(x)
    torch.testing.assert_close(ours.x_hat, theirs.sae_out, rtol=1e-5, atol=1e-5)
    theirs_codes = torch.zeros(BATCH, D_SAE).scatter(1, theirs.latent_indices, theirs.latent_acts)
    torch.testing.assert_close(ours.codes, theirs_codes, rtol=1e-5, atol=1e-6)
    fvu = (x - ours.x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    torch.testing.assert_close(fvu, theirs.fvu, rtol=1e-5, atol=1e-6)


def test_topk_grads_match_sparsify_when_all_selected_are_positive():
    """sparsify's encoder backward skips the ReLU gate, so selected entries with π ≤ 0 (rows with fewer
    than k positive π) get gradient there; saelab follows the true derivative (see the dense test).
    Where every selected π is positive the two must agree."""
    sparsify = _sparsify()
    sae, sc = _pair(sparsify, dead_bias=False)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(6))
    ours, theirs = sae(x), sc(x)
    assert bool((ours.sparse.vals > 0).all())
    ((x - ours.x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).backward()
    theirs.fvu.backward()
    for a, b in [
        (sae.W_enc.grad.t(), sc.encoder.weight.grad),
        (sae.b_enc.grad, sc.encoder.bias.grad),
        (sae.W_dec.grad, sc.W_dec.grad),
        (sae.b_dec.grad, sc.b_dec.grad),
    ]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ the benchmark
def test_bench_topk_quick_prints_parity_table_and_ratio(capsys):
    _sparsify()
    from saelab.bench.__main__ import main

    assert main(["--quick", "--steps", "1", "--no-memory", "--device", "cpu", "--sections", "topk"]) == 0
    text = capsys.readouterr().out
    parity_line = next(line for line in text.splitlines() if line.startswith("parity: max |Δx̂| = "))
    assert float(parity_line.split("= ")[1].split(",")[0]) < 1e-4
    assert "saelab/sparsify" in text and "samples/s" in text


def test_bench_skips_missing_sections_and_peers(monkeypatch):
    import argparse

    from saelab.bench import SectionUnavailable, topk
    from saelab.bench.__main__ import run_section

    args = argparse.Namespace(quick=True, steps=1, device="cpu", memory=False)
    assert run_section("no_such_section", args) == [
        "[no_such_section] skipped: section not available in this checkout"
    ]

    def missing():
        raise SectionUnavailable("EleutherAI sparsify is not installed")

    monkeypatch.setattr(topk, "_sparsify_version", missing)
    assert run_section("topk", args) == ["[topk] skipped: EleutherAI sparsify is not installed"]


@pytest.mark.parametrize("column_major", [True, False])
@pytest.mark.parametrize("onednn", ["packed", "plain", None])
def test_encoder_affine_is_autocasts_addmm_bit_for_bit(column_major, onednn, monkeypatch):
    """The encoder's bf16 product (oneDNN's linear on CPU, over a prepacked or a plain weight, or addmm)
    equals what autocast makes of `addmm(b, x, W)`, for either memory order of W and widths that are not
    multiples of a block."""
    monkeypatch.setattr(kernels, "PACK_MIN_BATCH", 1 if onednn == "packed" else 1 << 30)
    if not onednn:
        monkeypatch.setattr(kernels, "has_onednn_linear", lambda dtype: False)
    elif not kernels.has_onednn_linear(torch.bfloat16):
        pytest.skip("this torch has no oneDNN linear")
    g = torch.Generator().manual_seed(5)
    x, b = torch.randn(37, 50, generator=g), torch.randn(300, generator=g)
    W = torch.randn(300, 50, generator=g).t() if column_major else torch.randn(50, 300, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.addmm(b, x, W)
    got = kernels.encoder_affine(x, W, b, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("onednn", ["packed", "plain", None])
def test_encoder_affine_in_fp32_is_the_product_to_rounding(onednn, monkeypatch):
    """In fp32 (oneDNN's linear on CPU, or addmm): within fp32 accumulation error of the float64 product."""
    monkeypatch.setattr(kernels, "PACK_MIN_BATCH", 1 if onednn == "packed" else 1 << 30)
    if not onednn:
        monkeypatch.setattr(kernels, "has_onednn_linear", lambda dtype: False)
    g = torch.Generator().manual_seed(6)
    x, W, b = (
        torch.randn(37, 50, generator=g),
        torch.randn(300, 50, generator=g).t(),
        torch.randn(300, generator=g),
    )
    got = kernels.encoder_affine(x, W, b, torch.float32)
    want = x.double() @ W.double() + b.double()
    bound = 51 * 2.0**-24 * (x.double().abs() @ W.double().abs() + b.double().abs()) * 1.01
    assert got.dtype == torch.float32 and bool(((got.double() - want).abs() <= bound).all())


@pytest.mark.parametrize("with_bdec", [True, False])
@pytest.mark.parametrize("x_grad", [False, True])
def test_column_encode_matches_autograd(with_bdec, x_grad):
    """π over a subset of latents and its gradients to x, b_dec, W_enc and b_enc, against autograd through
    (x − b_dec) W_enc[:, cols] + b_enc[cols] (float64; W_enc column-major as the SAE stores it)."""
    g = torch.Generator().manual_seed(8)
    batch, d_in, d_sae = 40, 12, 90
    cols = torch.tensor([3, 7, 8, 20, 55, 89])
    leaves = [
        torch.randn(batch, d_in, generator=g, dtype=torch.float64),
        torch.randn(d_in, generator=g, dtype=torch.float64),
        torch.randn(d_sae, d_in, generator=g, dtype=torch.float64).t(),  # column-major
        torch.randn(d_sae, generator=g, dtype=torch.float64),
    ]
    go = torch.randn(batch, cols.numel(), generator=g, dtype=torch.float64)
    grads = []
    for ours in (True, False):
        x, b_dec, W, b = (t.detach().clone().requires_grad_(i > 0 or x_grad) for i, t in enumerate(leaves))
        W = W.detach().t().contiguous().t().requires_grad_()  # keep the column-major strides
        bd = b_dec if with_bdec else None
        if ours:
            pre = kernels.ColumnEncode.apply(x, bd, W, b, cols, torch.float64)
        else:
            pre = ((x - bd) if with_bdec else x) @ W[:, cols] + b[cols]
        pre.backward(go)
        grads.append((pre.detach(), [t.grad for t in (x, b_dec, W, b)]))
    (pre_a, ga), (pre_b, gb) = grads
    torch.testing.assert_close(pre_a, pre_b)
    for a, b in zip(ga, gb, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    assert ga[2].stride() == (1, d_in)  # W_enc's gradient in W_enc's own memory order
