"""`Ortho` and `Matryoshka` take shortcuts for speed; here their values and gradients are checked against
the naive formulas (methods.md §2.1 pseudocode for OrtSAE, the per-prefix decode for Matryoshka)."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.objectives import Matryoshka, Ortho
from saelab.objectives.terms import most_similar
from saelab.sae import SAE, BatchTopK, ReLU, TopK
from saelab.types import TrainState


# ------------------------------------------------------------------------------------------------ ortho
def naive_ortho(
    W: torch.Tensor, state: TrainState, chunk_size: int, every: int, absolute: bool
) -> torch.Tensor:
    """The paper's pseudocode on the term's chunks: full Gram matrix per chunk with autograd, diagonal −inf."""
    if state.step % every != 0:
        return W.new_zeros(())
    m = W.shape[0]
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8**0.5)  # Ortho's δ = 1e-8
    perm = torch.randperm(m, generator=state.generator("cpu", salt=17))
    terms = []
    for idx in perm.chunk(max(1, math.ceil(m / chunk_size))):
        if idx.numel() < 2:
            continue
        C = Wn[idx] @ Wn[idx].t()
        if absolute:
            C = C.abs()
        C = C.masked_fill(torch.eye(idx.numel(), dtype=torch.bool), -math.inf)
        terms.append(C.max(dim=1).values.pow(2).mean())
    return torch.stack(terms).mean() * every


def _decoder(m: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # rows of uneven norm, and a shared direction so that the cosines are not all near 0
    W = torch.randn(m, d, generator=g) + 0.5 * torch.randn(1, d, generator=g)
    return W * torch.rand(m, 1, generator=g).add(0.2)


@pytest.mark.parametrize("gram_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize(
    ("m", "d", "chunk_size", "every", "step"),
    [
        (64, 16, 16, 1, 0),  # 4 equal chunks
        (50, 8, 12, 3, 6),  # uneven chunks, a computing step of every 3rd
        (50, 8, 12, 3, 7),  # a skipped step: 0 and no gradient
        (5, 3, 2, 5, 10),  # a chunk of one latent is left out
        (300, 24, 300, 1, 4),  # one chunk of 300: 64 interleaved tiles of 5 columns, padding
    ],
)
def test_ortho_value_and_gradient_equal_the_naive_formula(
    gram_dtype, absolute, m, d, chunk_size, every, step
):
    W = _decoder(m, d, seed=m + d)
    state = TrainState(step=step, seed=5)
    term = Ortho(chunk_size=chunk_size, every_n_steps=every, absolute=absolute, gram_dtype=gram_dtype)

    class Dec:  # only W_dec is read
        W_dec = W.clone().requires_grad_(True)

    fast = term(None, Dec, state)
    W_ref = W.clone().requires_grad_(True)
    ref = naive_ortho(W_ref, state, chunk_size, every, absolute)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    if step % every != 0:
        assert fast.item() == 0.0 and not fast.requires_grad
        return
    fast.backward()
    ref.backward()
    torch.testing.assert_close(Dec.W_dec.grad, W_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("absolute", [False, True])
def test_most_similar_in_bf16_finds_the_fp32_argmax_among_near_ties(absolute):
    """Rows with several partners whose cosines differ by ~1e-3 (below bf16's resolution of ~4e-3 near 1):
    the bf16 Gram alone cannot order them, the fp32 confirmation must. Where the two best differ by less
    than fp32's own rounding (~1e-7) either is the fp32 argmax, so there the value is compared."""
    g = torch.Generator().manual_seed(0)
    c, d = 600, 48
    base = torch.randn(c // 6, d, generator=g)
    base = base / base.norm(dim=1, keepdim=True)
    # six copies of each base direction, tilted by 0.03, 0.06, …: partners' cosines differ by ~1e-3
    tilt = torch.randn(c, d, generator=g)
    scale = (torch.arange(c) % 6 + 1).float()[:, None] * 0.03
    W = base.repeat_interleave(6, 0) + scale * tilt / tilt.norm(dim=1, keepdim=True)
    W = W * torch.where(torch.arange(c) % 2 == 0, 1.0, -1.0)[:, None]  # signs matter for absolute=False
    Wn = W / W.norm(dim=1, keepdim=True)
    C = Wn @ Wn.t()
    if absolute:
        C = C.abs()
    C.fill_diagonal_(-math.inf)
    top2 = C.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5  # the fp32 argmax is well defined
    assert int((clear & ((top2[:, 0] - top2[:, 1]) < 4e-3)).sum()) > 50  # near-ties for bf16
    for block in (64, 1024):
        for dtype in (torch.bfloat16, torch.float32):
            got = most_similar(Wn, absolute, dtype, block=block)
            assert torch.equal(got[clear], C.argmax(1)[clear])
            chosen = C.gather(1, got[:, None]).squeeze(1)
            torch.testing.assert_close(chosen, top2[:, 0], rtol=0, atol=1e-6)


def test_most_similar_in_bf16_on_random_decoders():
    for seed in range(4):
        Wn = _decoder(1000, 32, seed)
        Wn = Wn / Wn.norm(dim=1, keepdim=True)
        C = Wn @ Wn.t()
        C.fill_diagonal_(-math.inf)
        assert torch.equal(most_similar(Wn, False, torch.bfloat16, block=256), C.argmax(1))


@pytest.mark.parametrize("block", [None, 100, 4096])
@pytest.mark.parametrize("absolute", [False, True])
def test_most_similar_each_pair_once_against_the_float64_argmax(block, absolute):
    """The bf16 path forms each pair's cosine once (block a against rows from a's first on): blocks that do
    not divide the rows, one block for all, and the default, against the float64 argmax; rows whose best
    cosine is negative (the bit-pattern comparison is then off) in the last case."""
    for seed, (c, d) in enumerate([(999, 17), (1000, 32)]):
        Wn = _decoder(c, d, seed)
        Wn = Wn / Wn.norm(dim=1, keepdim=True)
        C = Wn.double() @ Wn.double().t()
        C = C.abs() if absolute else C
        C.fill_diagonal_(-math.inf)
        assert torch.equal(most_similar(Wn, absolute, torch.bfloat16, block=block), C.argmax(1))
    # 0 and 1 opposite, 2 near 1: row 0's best cosine is negative; with |·| row 2 ties 0 and 1 (the smaller)
    Wn = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-0.9, -0.1]]), dim=1)
    want = [1, 0, 0] if absolute else [2, 2, 1]
    assert most_similar(Wn, absolute, torch.bfloat16, block=block).tolist() == want


def test_ortho_rejects_an_unknown_gram_dtype():
    with pytest.raises(ValueError, match="gram_dtype"):
        Ortho(gram_dtype="float16")


# ------------------------------------------------------------------------------------------- matryoshka
def naive_matryoshka(sae: SAE, codes: torch.Tensor, x: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """(1/n) Σ_m (1/B) Σ_b ‖x_b − (b_dec + f_b[:m] W_dec[:m])‖²."""
    losses = [(x - (codes[:, :m] @ sae.W_dec[:m] + sae.b_dec)).pow(2).sum(-1).mean() for m in bounds]
    return torch.stack(losses).mean()


def _params(sae: SAE) -> list[torch.Tensor]:
    return [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]


@pytest.mark.parametrize("activation", ["batchtopk", "topk", "relu"])
@pytest.mark.parametrize(
    "term",
    [
        Matryoshka(group_fractions=[1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2]),
        Matryoshka(groups=[3, 1, 20, 40]),  # a one-latent group, likely empty on some rows
        Matryoshka(random_prefixes=4),
        Matryoshka(groups=[64]),
    ],
    ids=["fractions", "groups", "random", "single"],
)
def test_matryoshka_value_and_gradient_equal_the_per_prefix_formula(activation, term):
    torch.manual_seed(0)
    act = {"batchtopk": BatchTopK(6), "topk": TopK(6), "relu": ReLU()}[activation]
    sae = SAE(12, 64, act, b_dec_init="zeros", seed=1)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
    x = torch.randn(32, 12)
    state = TrainState(step=3, seed=2)
    bounds = term.prefixes(64, state)

    out = sae(x)
    fast = term(out, sae, state)
    g_fast = torch.autograd.grad(fast, _params(sae))
    out = sae(x)
    ref = naive_matryoshka(sae, out.codes, x, bounds)
    g_ref = torch.autograd.grad(ref, _params(sae))
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
