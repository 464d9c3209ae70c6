"""Loss terms. Each is a small callable with one signature, `term(out, sae, state) -> scalar`.

`out` is the `SAEOutput` of the step, `sae` the module (for its weights), `state` the `TrainState`.
A term returns its raw value; `weight(state)` gives the multiplier the `Objective` applies (its
coefficient, times a warm-up factor where the term has one). Reductions: "sum over d_in, mean over
the batch" unless stated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

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
    """

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
        pre = sae.encode_pre(out.x, dead)  # (batch, n_dead), with gradient
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        batch = pre.shape[0]
        offsets = torch.arange(batch, device=pre.device) * k
        e_hat = F.embedding_bag(
            dead[idx].reshape(-1), sae.W_dec, offsets, mode="sum", per_sample_weights=vals.relu().reshape(-1)
        ).float()
        loss = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
        return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)


class Ortho(Term):
    """OrtSAE chunked orthogonality penalty (Korznikov et al. 2025, arXiv:2509.22033, Eqs. 3–5).

    Latents are randomly split into K = ⌈d_sae / chunk_size⌉ equal chunks each step; within a chunk
    every latent's largest cosine similarity to another latent of the chunk is squared:

        L_orth = (1/K) Σ_k (1/|C_k|) Σ_{i∈C_k} (max_{j∈C_k, j≠i} cos(W_i, W_j))²

    cos uses max(‖W_i‖‖W_j‖, δ). With `every_n_steps = n > 1` the term is computed on every n-th step
    only and multiplied by n (the paper's cheaper variant). `absolute=True` takes |cos|.
    """

    def __init__(
        self,
        coeff: float = 0.25,
        chunk_size: int = 8192,
        every_n_steps: int = 1,
        absolute: bool = False,
        delta: float = 1e-8,
    ) -> None:
        super().__init__(coeff)
        if chunk_size < 2 or every_n_steps < 1:
            raise ValueError("ortho needs chunk_size >= 2 and every_n_steps >= 1.")
        self.chunk_size, self.every_n_steps = int(chunk_size), int(every_n_steps)
        self.absolute, self.delta = absolute, delta

    def __call__(self, out: SAEOutput, sae: SAELike, state: TrainState) -> Tensor:
        W = sae.W_dec.float()
        if state.step % self.every_n_steps != 0:
            return W.new_zeros(())
        m = W.shape[0]
        Wn = W / W.norm(dim=1, keepdim=True).clamp_min(self.delta**0.5)
        n_chunks = max(1, math.ceil(m / self.chunk_size))
        perm = torch.randperm(m, generator=state.generator("cpu", salt=17)).to(W.device)
        terms = []
        for idx in perm.chunk(n_chunks):
            if idx.numel() < 2:
                continue
            C = Wn[idx] @ Wn[idx].t()  # (c, c) cosine similarities
            if self.absolute:
                C = C.abs()
            C = C - torch.eye(idx.numel(), device=W.device) * 1e4  # drop i == j from the max
            terms.append(C.max(dim=1).values.pow(2).mean())
        if not terms:
            return W.new_zeros(())
        return torch.stack(terms).mean() * self.every_n_steps


class Matryoshka(Term):
    """Nested-prefix reconstruction loss (Bussmann et al. 2025, arXiv:2503.17547; Nabeshima 2024).

    For prefix lengths m_1 < … < m_n = d_sae, x̂_m uses only latents [0, m):
        L = (1/n) Σ_m (1/B) Σ_b ‖y_b − x̂_{m,b}‖²
    Prefixes are either fixed (`groups`: group sizes summing to d_sae, e.g. [d/16, d/16, d/8, d/4, d/2]
    of the dictionary) or `random_prefixes` lengths redrawn each step from a truncated Pareto with
    power `pareto_power` (favouring short prefixes), always including d_sae. `group_fractions` gives
    the fixed groups as shares of d_sae instead (the last group takes the rounding remainder). x̂_m is formed as the full
    x̂ minus the decoded contributions of latents ≥ m, so it works on the sparse path and for a
    residual SAE. `groups=[d_sae]` reduces to `MSE`.
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
        starts = [0] + bounds[:-1]
        # contribution of each block [start, end) to x̂, as (n_blocks, batch, d_in)
        blocks: list[Tensor] = []
        for s, e in zip(starts, bounds):
            if out.sparse is not None:
                sp = out.sparse
                keep = (sp.cols >= s) & (sp.cols < e)
                part = torch.zeros_like(out.x_hat).index_add(
                    0, sp.rows[keep], sp.vals[keep, None] * sae.W_dec[sp.cols[keep]]
                )
            else:
                part = out.codes[:, s:e] @ sae.W_dec[s:e]
            blocks.append(part)
        parts = torch.stack(blocks)
        # x̂ with prefix p = full x̂ − Σ of blocks after p  (reverse cumulative sum)
        tail = parts.flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{j≥i} parts[j]
        y = out.x.float()
        losses = []
        for i in range(len(bounds)):
            after = tail[i + 1] if i + 1 < len(bounds) else 0.0
            x_hat_p = out.x_hat - after
            losses.append((y - x_hat_p.float()).pow(2).sum(-1).mean())
        return torch.stack(losses).mean()
