"""Latent activation functions: ReLU, TopK, BatchTopK and JumpReLU.

Dense activations (`ReLU`, `JumpReLU`) map pre-activations to codes. Sparse ones (`TopK`,
`BatchTopK`) only *select* which (row, latent) entries survive; the SAE then evaluates and
decodes those entries sparsely (see `saelab.kernels`).

Under bf16 autocast the selections read bf16 π, as sparsify's top-k does: a bf16 π has 8 significant
bits, so equal values at the k-th place are common, and ties there go to the lowest latent index
(`saelab.kernels.topk_indices`), the same on CPU and CUDA. fp32 and fp64 π keep torch.topk, where ties
are measure-zero events, so the fp32 path is unchanged. Dense activations get π already upcast by the SAE.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from saelab.kernels import LOW_PRECISION, ScreenPolicy, top_candidates, topk_indices


class ReLU(nn.Module):
    """f = max(π, 0) (Bricken et al. 2023; sparsity comes from an L1 term in the objective)."""

    sparse = False

    def forward(self, pre: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_sae"]:
        return torch.relu(pre)


class TopK(nn.Module):
    """Keep the k largest pre-activations of each row, then ReLU (Gao et al. 2024, arXiv:2406.04093).

    Every row has exactly k selected entries; entries whose value is ≤ 0 are kept in the selection
    with value 0 after ReLU, so the L0 of a row can be below k but never above.

    `screen` (fp32 SAEs only): find the fp32 top-k from a bf16 product of the encoder, certified exact row
    by row (`saelab.kernels.screened_topk`; rows it cannot certify are recomputed in fp32). The selection
    is the fp32 one; the step is faster where bf16 products are. None (auto) screens on CPUs with fast bf16
    products and encoders of at least 4 Mi weights, while it pays (`saelab.kernels.ScreenPolicy`: not while
    more than 5% of rows need the second pass); True always (where the weights are fp32 and autocast is
    off); False never. The SAE's `pre_acts` is then the bf16 product.
    """

    sparse = True

    def __init__(self, k: int, screen: bool | None = None) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"TopK needs k >= 1, got k={k}.")
        if screen not in (None, True, False):
            raise ValueError(f"TopK screen must be true, false or null (auto), got {screen!r}.")
        self.k = k
        self.screen = screen
        self.screen_policy = ScreenPolicy()  # consulted when screen is None (auto)

    @torch.no_grad()
    def select(self, pre: Float[Tensor, "batch d_sae"]) -> tuple[Int[Tensor, " nnz"], Int[Tensor, " nnz"]]:
        batch, d_sae = pre.shape
        if self.k > d_sae:
            raise ValueError(f"TopK k={self.k} exceeds d_sae={d_sae}; lower sae.activation.k.")
        if pre.dtype in LOW_PRECISION:
            cols = topk_indices(pre, self.k)  # (batch, k) ascending; ties to the lowest latent
        else:
            cols = top_candidates(pre, self.k)[1]  # (batch, k), what torch.topk selects
        rows = torch.arange(batch, device=pre.device).repeat_interleave(self.k)
        return rows, cols.reshape(-1)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class BatchTopK(nn.Module):
    """Keep the batch·k largest pre-activations across the whole batch (Bussmann et al. 2024, arXiv:2412.06410).

    Rows get a variable number of latents whose mean is k. During training a global threshold θ is
    tracked as an exponential moving average of the smallest selected positive activation,
    θ ← m·θ + (1 − m)·min_pos; at inference (`eval()`), selection is f_i = π_i·1[π_i > θ]
    (a JumpReLU with one shared threshold), so the output of a row no longer depends on its batch.
    """

    sparse = True
    threshold: Tensor  # buffer: the inference threshold θ (< 0 until estimated)

    def __init__(self, k: int, threshold_momentum: float = 0.99) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"BatchTopK needs k >= 1, got k={k}.")
        self.k = k
        self.threshold_momentum = threshold_momentum
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not yet estimated

    @torch.no_grad()
    def select(self, pre: Float[Tensor, "batch d_sae"]) -> tuple[Int[Tensor, " nnz"], Int[Tensor, " nnz"]]:
        batch, d_sae = pre.shape
        if not self.training:
            if self.threshold < 0:
                raise RuntimeError(
                    "BatchTopK has no inference threshold yet: train for at least one step, "
                    "or call .train() to select by batch top-k."
                )
            # compared in the threshold's dtype: a bf16 π against the fp32 θ, exactly
            rows, cols = (pre.to(self.threshold.dtype) > self.threshold).nonzero(as_tuple=True)  # row-major
            return rows, cols
        n = min(self.k * batch, pre.numel())
        if pre.dtype in LOW_PRECISION:
            idx = topk_indices(pre.reshape(1, -1), n)[0]  # ascending; ties to the lowest (row, latent)
            values = pre.reshape(-1)[idx]
        else:
            flat = pre.reshape(-1).topk(n, sorted=False)
            idx, values = flat.indices.sort().values, flat.values  # sorted flat index ⇒ rows sorted
        rows, cols = idx // d_sae, idx % d_sae
        pos = values[values > 0]
        if pos.numel():
            m = pos.min().to(self.threshold.dtype)
            if self.threshold < 0:
                self.threshold.copy_(m)
            else:
                self.threshold.mul_(self.threshold_momentum).add_((1 - self.threshold_momentum) * m)
        return rows, cols

    def extra_repr(self) -> str:
        return f"k={self.k}, threshold={float(self.threshold):.4g}"


def _rect(u: Tensor) -> Tensor:
    """Rectangle kernel K(u) = 1[|u| < 1/2]."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """JumpReLU_θ(π) = π·H(π − θ) with the pseudo-derivative ∂/∂θ := −(θ/ε)·K((π − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_out * (pre > threshold)
        grad_threshold = (-(threshold / eps) * _rect((pre - threshold) / eps) * grad_out).sum(0)
        return grad_pre, grad_threshold, None


class _StepFn(torch.autograd.Function):
    """H(π − θ) with ∂/∂θ := −(1/ε)·K((π − θ)/ε) and no gradient to π (used by the L0 term)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = (-(1.0 / eps) * _rect((pre - threshold) / eps) * grad_out).sum(0)
        return torch.zeros_like(pre), grad_threshold, None


class JumpReLU(nn.Module):
    """f = π·H(π − θ) with a learned per-latent θ = exp(log θ) (Rajamanoharan et al. 2024, arXiv:2407.14435).

    Gradients reach θ through straight-through pseudo-derivatives with a rectangle kernel of width
    `bandwidth` (ε); pair it with the `l0` objective term.
    """

    sparse = False

    def __init__(self, d_sae: int, threshold_init: float = 0.001, bandwidth: float = 0.001) -> None:
        super().__init__()
        if threshold_init <= 0 or bandwidth <= 0:
            raise ValueError("JumpReLU needs threshold_init > 0 and bandwidth > 0.")
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(threshold_init)))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def forward(self, pre: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_sae"]:
        return _JumpReLUFn.apply(pre, self.threshold, self.bandwidth)

    def heaviside(self, pre: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_sae"]:
        """H(π − θ) with the STE gradient to θ, for the L0 penalty."""
        return _StepFn.apply(pre, self.threshold, self.bandwidth)
