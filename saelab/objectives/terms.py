"""Loss terms. Each is a small callable with one signature, `term(out, sae, state) -> scalar`.

`out` is the `SAEOutput` of the step, `sae` the module (for its weights), `state` the `TrainState`.
A term returns its raw value; `weight(state)` gives the multiplier the `Objective` applies (its
coefficient, times a warm-up factor where the term has one). Reductions: "sum over d_in, mean over
the batch" unless stated.

Every term is fp32 also under bf16 autocast (`trainer.precision=bf16-mixed`), as sparsify computes its FVU
and AuxK from its fp32 decoder output: the SAE hands over fp32 `x`, `x_hat` and codes, the elementwise
arithmetic here is never autocast, and the products that would be (Matryoshka's dense block decode, the
Ortho Gram matrix) run with autocast off. The one bf16 product is AuxK's dead-latent π, an encoder product
like the SAE's own (sparsify's AuxK also ranks the bf16 π); its selection, decode and loss are fp32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from saelab.kernels import (
    _BITS_AS_INT,
    LOW_PRECISION,
    _csr,
    fast_bf16,
    no_autocast,
    sparse_decode,
    topk_indices,
)
from saelab.types import SAELike, SAEOutput, TrainState


class Term:
    """Base for loss terms: holds the coefficient and an optional linear warm-up."""

    def __init__(self, coeff: float = 1.0, warmup_steps: int = 0) -> None:
        self.coeff = float(coeff)
        self.warmup_steps = int(warmup_steps)

    def weight(self, state: TrainState) -> float:
        if self.warmup_steps <= 0:
            return self.coeff
        return self.coeff * min(1.0, (state.step + 1) / self.warmup_steps)

    def __call__(self, out: SAEOutput, sae: SAELike, state: TrainState) -> Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in vars(self).items())})"


def _sse(out: SAEOutput) -> Tensor:
    """Per-row squared error Σ_d (y − x̂)², computed in float32."""
    return (out.x.float() - out.x_hat.float()).pow(2).sum(-1)


class MSE(Term):
    """L_mse = (1/B) Σ_b ‖y_b − x̂_b‖²."""

    def __call__(self, out: SAEOutput, sae: SAELike, state: TrainState) -> Tensor:
        return _sse(out).mean()


class FVU(Term):
    """Fraction of variance unexplained over the batch: Σ_b ‖y_b − x̂_b‖² / Σ_b ‖y_b − ȳ‖² (ȳ = batch mean).

    This is what RecSAE and sparsify train on (1 − explained variance of the batch).
    """

    def __call__(self, out: SAEOutput, sae: SAELike, state: TrainState) -> Tensor:
        y = out.x.float()
        return _sse(out).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)


class Tilted(Term):
    """Tilted empirical risk (TERM; Li et al., ICLR 2021, arXiv:2007.01162) over per-row reconstruction losses.

    R̃(t) = (1/t) · log( (1/B) Σ_b exp(t·ℓ_b) ),  ℓ_b = ‖y_b − x̂_b‖².

    t → 0 recovers the mean (ERM, i.e. `MSE`); t → +∞ approaches max_b ℓ_b, so rare high-loss tokens
    dominate the gradient (weights softmax(t·ℓ)). Used by Specialized SAEs (Muhamed et al. 2025,
    arXiv:2411.00743) with t = 500 and t = 1e9. Computed with logsumexp in float32, so it is stable
    for any t. With `scale="mean"`, ℓ_b is divided by the (detached) batch mean of ℓ so that t is
    unit-free; the default "none" is the paper's formula.
    """

    def __init__(
        self, t: float = 1.0, scale: str = "none", coeff: float = 1.0, warmup_steps: int = 0
    ) -> None:
        super().__init__(coeff, warmup_steps)
        if scale not in ("none", "mean"):
            raise ValueError(f"tilted.scale must be 'none' or 'mean', got {scale!r}.")
        self.t, self.scale = float(t), scale

    def __call__(self, out: SAEOutput, sae: SAELike, state: TrainState) -> Tensor:
        loss = _sse(out)
        s = loss.detach().mean().clamp_min(1e-12) if self.scale == "mean" else loss.new_tensor(1.0)
        loss = (loss / s).double()
        t = self.t
        if t == 0.0:
            return (loss.mean() * s).float()
        # R = c + (1/t)·log1p(mean(expm1(t(ℓ − c)))) is exact for any constant c. Centering at the mean keeps
        # precision as t → 0 (expm1/log1p are accurate near 0); centering at the max (min for t < 0)
        # keeps every exponent ≤ 0 for large |t|, so nothing overflows.
        spread = float((loss.max() - loss.min()).detach())
        if abs(t) * spread < 1.0:
            c = loss.detach().mean()
        else:
            c = loss.detach().max() if t > 0 else loss.detach().min()
        r = c + torch.log1p(torch.expm1(t * (loss - c)).mean()) / t
        return (r * s).float()


class L1(Term):
    """L_1 = (1/B) Σ_b Σ_i f_bi · ‖W_dec,i‖ (decoder-norm weighted; plain L1 for a unit-norm decoder).

    The Anthropic April-2024 form; `warmup_steps` ramps the coefficient linearly from 0.
    """

    def __init__(
        self, coeff: float = 1e-3, warmup_steps: int = 0, weight_by_decoder_norm: bool = True
    ) -> None:
        super().__init__(coeff, warmup_steps)
        self.weight_by_decoder_norm = weight_by_decoder_norm

    def __call__(self, out: SAEOutput, sae: SAELike, state: TrainState) -> Tensor:
        codes = out.codes.float().abs()
        if self.weight_by_decoder_norm:
            codes = codes * sae.W_dec.float().norm(dim=1)
        return codes.sum(-1).mean()


class L0(Term):
    """L_0 = (1/B) Σ_b Σ_i H(π_bi − θ_i) with the JumpReLU straight-through gradient to θ.

    Rajamanoharan et al. 2024 (arXiv:2407.14435): ∂H/∂θ := −(1/ε)·K((π − θ)/ε). Needs a JumpReLU SAE.
    """

    def __call__(self, out: SAEOutput, sae: SAELike, state: TrainState) -> Tensor:
        heaviside = getattr(sae.activation, "heaviside", None)
        if heaviside is None:
            raise ValueError(
                f"the l0 term needs a JumpReLU activation, got {type(sae.activation).__name__}: use sae=jumprelu."
            )
        return heaviside(out.pre_acts).sum(-1).mean()


class AuxK(Term):
    """Auxiliary TopK loss for dead latents (Gao et al. 2024, arXiv:2406.04093, App. A.2).

    e = y − x̂ (detached). Among latents dead by the trainer's token counter, take each row's top
    k_aux pre-activations, decode them without b_dec, ê = Σ f_aux W_dec, and return the normalised
    error ‖e − ê‖² / ‖e − ē‖² (summed over the batch). Zero when no latent is dead; a non-finite value
    (e.g. a constant residual) is replaced by 0. The default coefficient is α = 1/32.

    The gradient reaches the dead latents' encoder and decoder, as in the paper and SAELens (sparsify's
    fused encoder passes none to the encoder). ê is decoded with dense products over the dead latents'
    decoder rows when the batch·k_aux codes fill at least 1/16 of the [batch, n_dead] block, sparsely
    otherwise; the dead latents' π come from `SAE.encode_pre` (`kernels.ColumnEncode`). At batch 4096,
    d_in 768, d_sae 16384 with 5% dead a step went from 1.66 s to 0.90 s (0.56 s without AuxK).
    """

    # decode densely over the dead latents when the aux codes fill at least 1/DENSE_FILL of them: a sparse
    # decode of batch·k_aux entries (2 Mi at batch 4096) runs far below a dense product's rate
    DENSE_FILL = 16

    def __init__(self, coeff: float = 1 / 32, k_aux: int = 512) -> None:
        super().__init__(coeff)
        self.k_aux = int(k_aux)

    def __call__(self, out: SAEOutput, sae: SAELike, state: TrainState) -> Tensor:
        zero = out.x_hat.new_zeros(()).float()
        if state.dead_mask is None or not bool(state.dead_mask.any()):
            return zero
        dead = state.dead_mask.nonzero(as_tuple=True)[0]
        k = min(self.k_aux, dead.numel())
        e = (out.x - out.x_hat).detach().float()
        pre = sae.encode_pre(out.x, dead)  # (batch, n_dead), with gradient; bf16 under autocast
        if pre.dtype in LOW_PRECISION:  # bf16 ties at the k-th value go to the lowest index
            idx = topk_indices(pre.detach(), k)
            vals = pre.gather(-1, idx)
        else:
            vals, idx = pre.topk(k, dim=-1, sorted=False)
            idx, order = idx.sort(dim=-1)  # columns ascending within each row, as the CSR products expect
            vals = vals.gather(-1, order)
        vals = vals.to(sae.W_dec.dtype).relu()  # decoded in fp32 (autocast off)
        batch = pre.shape[0]
        if k * self.DENSE_FILL >= dead.numel():
            # the aux codes fill ≥ 1/DENSE_FILL of the [batch, n_dead] block (k_aux = 512 against a few
            # thousand dead latents is most of it): dense products over the dead latents' decoder rows
            with no_autocast(pre.device):
                codes = torch.zeros(batch, dead.numel(), dtype=vals.dtype, device=vals.device)
                e_hat = (codes.scatter(-1, idx, vals) @ sae.W_dec.index_select(0, dead)).float()
        else:
            rows = torch.arange(batch, device=pre.device).repeat_interleave(k)
            # the SAE's own sparse decode (SparseDecode: CSR products in the backward), shared with Matryoshka
            e_hat = sparse_decode(rows, dead[idx].reshape(-1), vals.reshape(-1), sae.W_dec, batch).float()
        loss = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
        return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)


# Gram entries in bf16 are within 3u (u = 2⁻⁸) of the exact cosine for rows of norm ≤ 1: 2u + u² from
# rounding both inputs (Cauchy–Schwarz bounds Σ|a_k b_k| by ‖a‖‖b‖), u from rounding the output, ~d·2⁻²⁴
# from fp32 accumulation. So the true argmax j* has G(j*) ≥ c* − 3u ≥ max_j G(j) − 6u; 8u leaves slack.
_BF16_MARGIN = 2.0**-5
_GRAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def _fp32_accumulation(device: torch.device):
    """bf16 products accumulate in fp32 (cuBLAS may otherwise reduce split-K partials in bf16)."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    old = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction = old


@torch.no_grad()
def most_similar(
    Wn: Float[Tensor, "c d"],
    absolute: bool = False,
    gram_dtype: torch.dtype = torch.float32,
    block: int | None = None,
) -> Int[Tensor, " c"]:
    """Each row's most similar other row: argmax_{j≠i} (Wn Wnᵀ)_ij (|·| if `absolute`), smallest j on ties.

    `Wn` has rows of norm ≤ 1 (normalised decoder rows), so the entries are cosines. The Gram matrix is
    formed `block` rows at a time and never kept whole. In fp32 this is the plain argmax
    (`_most_similar_fp32`). In bf16 (`_most_similar_bf16`) every entry is within 3u of the exact value (see
    `_BF16_MARGIN`), so the argmax is among the entries within 8u of the row's bf16 maximum: those few are
    recomputed in fp32 (a sampled product, as in the sparse decoder's backward) and the largest taken,
    which is the fp32 argmax.
    """
    if gram_dtype == torch.float32:
        return _most_similar_fp32(Wn, absolute, block)
    return _most_similar_bf16(Wn, absolute, gram_dtype, block)


def _most_similar_fp32(Wn: Tensor, absolute: bool, block: int | None) -> Tensor:
    """`most_similar` in fp32: each block of rows against all rows (default 2²⁵ entries a block). To find
    each row's maximum without a second pass over every entry, each row of G is cut into `w` interleaved
    tiles (columns t, t + n_t, t + 2n_t, …), whose maxima are one elementwise max over w contiguous slices."""
    c, d = Wn.shape
    w = min(64, c)
    n_t = -(-c // w)  # tiles per row; the columns are padded to w·n_t
    Wg = torch.cat([Wn, Wn.new_zeros(w * n_t - c, d)])  # (w·n_t, d)
    out = torch.empty(c, dtype=torch.long, device=Wn.device)
    block = block or max(1, 2**25 // (w * n_t))
    for r0 in range(0, c, block):
        b = min(block, c - r0)
        with no_autocast(Wn.device):  # the product in fp32 whatever a caller's autocast (bf16-mixed) says
            G = Wg[r0 : r0 + b] @ Wg.t()  # (b, w·n_t) cosines of this block's rows with the whole chunk
        if absolute:
            G.abs_()
        G.diagonal(offset=r0).fill_(-math.inf)  # j ≠ i
        G[:, c:] = -math.inf  # the padding
        tiles = G.view(b, w, n_t)  # tiles[r, s, t] = G[r, s·n_t + t]
        tile_max = tiles.amax(1)  # (b, n_t)
        thr = tile_max.amax(1)  # (b,) each row's maximum
        rr, tt = (tile_max >= thr[:, None]).nonzero(as_tuple=True)  # tiles holding it
        pr, ps = (tiles[rr, :, tt] >= thr[rr, None]).nonzero(as_tuple=True)
        rows, cols = rr[pr], ps * n_t + tt[pr]
        j = torch.full((b,), c, dtype=torch.long, device=Wn.device)
        out[r0 : r0 + b] = j.scatter_reduce(0, rows, cols, "amin")
    return out.clamp_(max=c - 1)  # only a NaN row has no maximum; its loss is NaN and reported as such


def _most_similar_bf16(Wn: Tensor, absolute: bool, gram_dtype: torch.dtype, block: int | None) -> Tensor:
    """`most_similar` from a bf16 Gram matrix, each pair {i, j} computed once (G is symmetric).

    Block a (rows r0 … r0 + b) is multiplied with the rows from r0 on only: its own square above the
    diagonal and everything right of it, about half of the whole product over all blocks. Its row maxima
    complete the maxima M_i of its own rows (their entries left of r0 came as columns of earlier blocks);
    its column maxima raise the running maxima of the later rows. An entry is kept as a candidate of row i
    (and of row j: the same value) if it is at least the row's running maximum − margin when the block is
    formed. Running maxima only grow, so that keeps every entry within the margin of the final M_i; the
    final M_i then sorts out the few that are not. Comparisons run on the bf16 bit patterns as int16 (the
    float order for non-negative values, and twice as fast here): a row whose maximum is negative (int
    order reversed) gets the floor −∞, which keeps all its entries. Candidates are then recomputed in fp32.
    """
    c, _ = Wn.shape
    dev = Wn.device
    Wg = Wn.to(gram_dtype)
    bits = _BITS_AS_INT[gram_dtype]
    block = block or max(1, min(1024, 2**25 // c))
    best = torch.full((c,), -math.inf, device=dev)  # running row maxima of the bf16 Gram entries (as fp32)
    found: list[tuple[Tensor, Tensor, Tensor]] = []
    for r0 in range(0, c, block):
        b = min(block, c - r0)
        with _fp32_accumulation(dev), no_autocast(dev):
            G = Wg[r0 : r0 + b] @ Wg[r0:].t()  # (b, c − r0): this block's rows against rows r0 on
        if absolute:
            G.abs_()
        Gi = G.view(bits)
        lower = torch.ones(b, b, dtype=torch.bool, device=dev).tril_()
        Gi[:, :b].masked_fill_(lower, torch.iinfo(bits).min)  # only j > i in the block's own square
        for peak in (Gi.amax(0), Gi.amax(1)):  # columns (rows r0 on), rows (this block's), as int
            val = torch.where(peak >= 0, peak.view(gram_dtype).float(), -math.inf)
            best[r0 : r0 + val.numel()] = torch.maximum(best[r0 : r0 + val.numel()], val)
        thr = _floor_bits(best[r0:] - _BF16_MARGIN, gram_dtype)  # (c − r0,) as int
        i, j = _nonzero(Gi >= torch.minimum(thr[None, :], thr[:b, None]))
        keep = j > i  # the masked entries pass where a floor is −∞
        i, j = i[keep], j[keep]
        found.append((i + r0, j + r0, G[i, j].float()))
    i, j, v = (torch.cat(t) for t in zip(*found))
    rows, cols, vals = torch.cat([i, j]), torch.cat([j, i]), torch.cat([v, v])
    near = vals >= best[rows] - _BF16_MARGIN
    key = torch.sort(rows[near] * c + cols[near]).values  # CSR order (cuSPARSE wants columns sorted too)
    rows, cols = key // c, key % c
    counts = torch.bincount(rows, minlength=c)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    pattern = _csr(crow, cols, Wn.new_zeros(cols.numel()), (c, c))
    exact = torch.sparse.sampled_addmm(pattern, Wn, Wn.t(), beta=0.0).values()
    if absolute:
        exact = exact.abs()
    top = exact.new_full((c,), -math.inf).scatter_reduce(0, rows, exact, "amax")
    win = exact >= top[rows]
    out = torch.full((c,), c, dtype=torch.long, device=dev)
    return out.scatter_reduce(0, rows[win], cols[win], "amin").clamp_(max=c - 1)  # a NaN row: see above


def _floor_bits(thr: Tensor, dtype: torch.dtype) -> Tensor:
    """Int bit patterns t with float(t) ≤ thr: thr rounded down to `dtype`; the int minimum (every entry
    passes) where thr is not positive, since the int order is the float order only for non-negative floats;
    the int maximum (none passes) where thr is NaN (a NaN row, whose loss is NaN and reported as such)."""
    t = thr.to(dtype)
    t = torch.where(t.float() > thr, torch.nextafter(t, t.new_full((), -math.inf)), t)
    bits = t.view(_BITS_AS_INT[dtype])
    info = torch.iinfo(bits.dtype)
    none, every = torch.full_like(bits, info.max), torch.full_like(bits, info.min)
    return torch.where(thr > 0, bits, torch.where(thr.isnan(), none, every))


def _nonzero(mask: Bool[Tensor, "b n"]) -> tuple[Tensor, Tensor]:
    """`mask.nonzero(as_tuple=True)` for a sparse mask: the bytes are scanned 8 at a time as int64 words,
    and only the words that are not zero are looked at byte by byte."""
    b, n = mask.shape
    flat = mask.reshape(-1)
    n8 = flat.numel() // 8 * 8
    words = flat[:n8].view(torch.int64).nonzero().squeeze(1)
    pos = (words[:, None] * 8 + torch.arange(8, device=mask.device)).reshape(-1)
    pos = torch.cat([pos[flat[pos]], n8 + flat[n8:].nonzero().squeeze(1)])
    return pos // n, pos % n


class Ortho(Term):
    """OrtSAE chunked orthogonality penalty (Korznikov et al. 2025, arXiv:2509.22033, Eqs. 3–5).

    Latents are randomly split into K = ⌈d_sae / chunk_size⌉ equal chunks each step; within a chunk
    every latent's largest cosine similarity to another latent of the chunk is squared:

        L_orth = (1/K) Σ_k (1/|C_k|) Σ_{i∈C_k} (max_{j∈C_k, j≠i} cos(W_i, W_j))²

    cos uses max(‖W_i‖‖W_j‖, δ). With `every_n_steps = n > 1` the term is computed on every n-th step
    only and multiplied by n (the paper's cheaper variant: keep `coeff` = γ, the ×n is applied here),
    so its mean over steps matches n = 1. `absolute=True` takes |cos|.

    The max has a gradient only through its argmax pair, so the chunk Gram matrices (O(d_sae·chunk·d_in))
    are formed without autograd, only to find each latent's partner j*(i) (`most_similar`; in bf16 where
    `gram_dtype="auto"` finds it fast, with the argmax confirmed in fp32), and cos(W_i, W_j*) is then
    recomputed with autograd for those pairs only (O(d_sae·d_in)). Value and gradient are those of the
    formula above.
    """

    def __init__(
        self,
        coeff: float = 0.25,
        chunk_size: int = 8192,
        every_n_steps: int = 1,
        absolute: bool = False,
        delta: float = 1e-8,
        gram_dtype: str = "auto",
    ) -> None:
        super().__init__(coeff)
        if chunk_size < 2 or every_n_steps < 1:
            raise ValueError("ortho needs chunk_size >= 2 and every_n_steps >= 1.")
        if gram_dtype != "auto" and gram_dtype not in _GRAM_DTYPES:
            raise ValueError(f"ortho.gram_dtype must be auto, float32 or bfloat16, got {gram_dtype!r}.")
        self.chunk_size, self.every_n_steps = int(chunk_size), int(every_n_steps)
        self.absolute, self.delta = absolute, delta
        self.gram_dtype = gram_dtype

    def _gram_dtype(self, device: torch.device) -> torch.dtype:
        if self.gram_dtype == "auto":
            return torch.bfloat16 if fast_bf16(device) else torch.float32
        return _GRAM_DTYPES[self.gram_dtype]

    def __call__(self, out: SAEOutput, sae: SAELike, state: TrainState) -> Tensor:
        W = sae.W_dec.float()
        if state.step % self.every_n_steps != 0:
            return W.new_zeros(())
        m = W.shape[0]
        Wn = W / W.norm(dim=1, keepdim=True).clamp_min(self.delta**0.5)  # (d_sae, d_in)
        n_chunks = max(1, math.ceil(m / self.chunk_size))
        perm = torch.randperm(m, generator=state.generator("cpu", salt=17)).to(W.device)
        chunks = [idx for idx in perm.chunk(n_chunks) if idx.numel() >= 2]
        if not chunks:
            return W.new_zeros(())
        # partner[i] = argmax_j of row i of its chunk's Gram matrix; weight[i] = 1/(K·|C_k|) (0: no chunk)
        partner = torch.arange(m, device=W.device)
        weight = W.new_zeros(m)
        gram_dtype = self._gram_dtype(W.device)
        for idx in chunks:
            partner[idx] = idx[most_similar(Wn.detach()[idx], self.absolute, gram_dtype)]
            weight[idx] = 1.0 / (len(chunks) * idx.numel())
        cos = (Wn * Wn.index_select(0, partner)).sum(-1)  # (d_sae,) cos(W_i, W_j*(i)), with gradient
        if self.absolute:
            cos = cos.abs()
        return (weight * cos.pow(2)).sum() * self.every_n_steps


class Matryoshka(Term):
    """Nested-prefix reconstruction loss (Bussmann et al. 2025, arXiv:2503.17547; Nabeshima 2024).

    For prefix lengths m_1 < … < m_n = d_sae, x̂_m uses only latents [0, m):
        L = (1/n) Σ_m (1/B) Σ_b ‖y_b − x̂_{m,b}‖²
    Prefixes are either fixed (`groups`: group sizes summing to d_sae, e.g. [d/16, d/16, d/8, d/4, d/2]
    of the dictionary) or `random_prefixes` lengths redrawn each step from a truncated Pareto with
    power `pareto_power` (favouring short prefixes), always including d_sae. `group_fractions` gives
    the fixed groups as shares of d_sae instead (the last group takes the rounding remainder).

    x̂_m is formed as the full x̂ minus the decoded contributions of latents ≥ m, so it works for a
    residual SAE too, and incrementally: x̂_{m_{p−1}} = x̂_{m_p} − D_p with D_p the decode of block
    [m_{p−1}, m_p) alone (on the sparse path one embedding-bag over the selected entries of blocks 2 … n),
    so every prefix costs one (batch, d_in) update, not a decode. `groups=[d_sae]` reduces to `MSE`.
    """

    def __init__(
        self,
        groups: Sequence[int] | None = None,
        group_fractions: Sequence[float] | None = None,
        random_prefixes: int = 0,
        pareto_power: float = 0.5,
        coeff: float = 1.0,
    ) -> None:
        super().__init__(coeff)
        given = [groups is not None, group_fractions is not None, random_prefixes > 0]
        if sum(given) != 1:
            raise ValueError(
                "matryoshka needs exactly one of `groups` (sizes), `group_fractions` or `random_prefixes` > 0."
            )
        self.groups = [int(g) for g in groups] if groups is not None else None
        self.group_fractions = [float(f) for f in group_fractions] if group_fractions is not None else None
        self.random_prefixes, self.pareto_power = int(random_prefixes), float(pareto_power)

    def prefixes(self, d_sae: int, state: TrainState) -> list[int]:
        if self.group_fractions is not None:
            sizes = [max(1, round(f * d_sae)) for f in self.group_fractions[:-1]]
            if sum(sizes) >= d_sae:
                raise ValueError(
                    f"matryoshka group_fractions {self.group_fractions} leave no room in d_sae={d_sae}."
                )
            return torch.tensor(sizes + [d_sae - sum(sizes)]).cumsum(0).tolist()
        if self.groups is not None:
            if sum(self.groups) != d_sae or min(self.groups) < 1:
                raise ValueError(
                    f"matryoshka groups {self.groups} must be positive and sum to d_sae={d_sae}."
                )
            return torch.tensor(self.groups).cumsum(0).tolist()
        n = min(self.random_prefixes, d_sae)
        if n <= 1 or d_sae < 2:
            return [d_sae]
        lengths = torch.arange(1, d_sae, dtype=torch.float64)  # candidate prefix lengths < d_sae
        a = self.pareto_power
        cdf = lambda x: 1 - x ** (-a)  # noqa: E731 - Pareto(a, x_m=1) CDF
        pmf = cdf(lengths + 1) - cdf(lengths)
        pick = torch.multinomial(pmf, n - 1, replacement=False, generator=state.generator("cpu", salt=29))
        return sorted(int(lengths[i]) for i in pick) + [d_sae]

    def __call__(self, out: SAEOutput, sae: SAELike, state: TrainState) -> Tensor:
        d_sae = sae.W_dec.shape[0]
        bounds = self.prefixes(d_sae, state)
        # r_p = y − x̂_p for the prefixes from the longest down: r_n = y − x̂ and r_{p−1} = r_p + D_p, where
        # D_p is the decoded contribution of block p (latents [m_{p−1}, m_p)); block 1 is never needed
        # unbind: one backward op for all blocks, not a zero-filled (n − 1, batch, d_in) gradient per block
        drops = self._blocks(out, sae, bounds).unbind(0)  # D_2 … D_n, each (batch, d_in)
        r = out.x.float() - out.x_hat.float()  # (batch, d_in)
        losses = [r.pow(2).sum(-1).mean()]
        for d in reversed(drops):
            r = r + d.float()
            losses.append(r.pow(2).sum(-1).mean())
        return torch.stack(losses).mean()

    @staticmethod
    def _blocks(out: SAEOutput, sae: SAELike, bounds: list[int]) -> Tensor:
        """The decoded contributions Σ_{j∈block} f_j W_dec[j] of blocks 2 … n, as (n − 1, batch, d_in)."""
        batch, n = out.x.shape[0], len(bounds) - 1
        if n == 0:
            return out.x_hat.new_zeros(0, *out.x_hat.shape)
        if out.sparse is None:
            codes = out.codes
            with no_autocast(codes.device):  # fp32 block decodes under bf16 autocast
                return torch.stack([codes[:, s:e] @ sae.W_dec[s:e] for s, e in zip(bounds[:-1], bounds[1:])])
        # sparse path: one embedding-bag over (block, row) bags, each non-zero entry decoded once
        sp = out.sparse
        block = torch.bucketize(
            sp.cols, sp.cols.new_tensor(bounds[:-1]), right=True
        )  # (nnz,) 0 (block 1) … n
        keep = (block >= 1).nonzero(as_tuple=True)[0]
        order = keep[torch.sort(block[keep], stable=True).indices]  # block-major; rows stay sorted
        bag = (block[order] - 1) * batch + sp.rows[order]  # (nnz_kept,) non-decreasing
        decoded = sparse_decode(
            bag, sp.cols[order], sp.vals[order], sae.W_dec, n * batch
        )  # (n · batch, d_in)
        return decoded.view(n, batch, -1)
