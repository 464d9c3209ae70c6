"""Streaming SAE metrics (torchmetrics). Formulas are in each docstring; accumulators are float64."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor
from torchmetrics import Metric


class L0(Metric):
    """Mean number of non-zero latents per token: L0 = (1/N) Σ_n #{i : f_ni ≠ 0}."""

    full_state_update = False
    total: Tensor
    n: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, l0_per_row: Float[Tensor, " batch"]) -> None:
        self.total += l0_per_row.double().sum()
        self.n += l0_per_row.numel()

    def compute(self) -> Tensor:
        return self.total / self.n.clamp_min(1)


class FVU(Metric):
    """Fraction of variance unexplained over the whole eval set (the SAELens streaming definition):

        FVU = E_n‖x_n − x̂_n‖² / (E_n‖x_n‖² − ‖E_n x_n‖²)

    i.e. the squared error over the total variance about the per-dimension mean of *all* evaluated
    tokens (not per batch). `ExplainedVariance` = 1 − FVU.
    """

    full_state_update = False
    sse: Tensor
    sum_sq: Tensor
    sum_x: Tensor
    n: Tensor

    def __init__(self, d_in: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sse", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Float[Tensor, "batch d_in"], x_hat: Float[Tensor, "batch d_in"]) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.sse += (x - x_hat).pow(2).sum()
        self.sum_sq += x.pow(2).sum()
        self.sum_x += x.sum(0)
        self.n += x.shape[0]

    def compute(self) -> Tensor:
        n = self.n.clamp_min(1)
        var = self.sum_sq / n - (self.sum_x / n).pow(2).sum()
        return (self.sse / n) / var.clamp_min(1e-30)


class ExplainedVariance(FVU):
    """EV = 1 − FVU (see `FVU`)."""

    def compute(self) -> Tensor:
        return 1 - super().compute()


class DeadFraction(Metric):
    """Share of latents that never fire on the evaluated tokens: (1/d_sae) Σ_i 1[Σ_n 1[f_ni ≠ 0] = 0].

    Also keeps per-latent firing counts, so `density()` gives each latent's firing frequency.
    """

    full_state_update = False
    fires: Tensor
    n: Tensor

    def __init__(self, d_sae: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("fires", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, fired_counts: Float[Tensor, " d_sae"], n_tokens: int) -> None:
        self.fires += fired_counts.double()
        self.n += n_tokens

    def density(self) -> Tensor:
        return self.fires / self.n.clamp_min(1)

    def compute(self) -> Tensor:
        return (self.fires == 0).double().mean()


@torch.no_grad()
def max_cosine(
    a: Float[Tensor, "n d"], b: Float[Tensor, "m d"] | None = None, chunk: int = 4096
) -> Float[Tensor, " n"]:
    """For each row of a, its largest cosine similarity to a row of b (to another row of a if b is None)."""
    an = a.float() / a.float().norm(dim=1, keepdim=True).clamp_min(1e-8)
    bn = an if b is None else b.float() / b.float().norm(dim=1, keepdim=True).clamp_min(1e-8)
    out = torch.empty(an.shape[0], device=a.device)
    for s in range(0, an.shape[0], chunk):
        sim = an[s : s + chunk] @ bn.t()  # (chunk, m)
        if b is None:
            idx = torch.arange(s, min(s + chunk, an.shape[0]), device=a.device)
            sim[torch.arange(idx.numel(), device=a.device), idx] = -2.0  # exclude self
        out[s : s + chunk] = sim.max(dim=1).values
    return out


class MeanMaxCosine(Metric):
    """MeanCosSim of a decoder (OrtSAE, arXiv:2509.22033): (1/m) Σ_i max_{j≠i} cos(W_dec,i, W_dec,j)."""

    full_state_update = True
    value: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("value", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="mean")

    def update(self, W_dec: Float[Tensor, "d_sae d_in"]) -> None:
        self.value = max_cosine(W_dec).double().mean()

    def compute(self) -> Tensor:
        return self.value


class FeatureRecovery(Metric):
    """Mean max cosine of true features to decoder rows: (1/n) Σ_t max_i cos(d_t, W_dec,i) (Sharkey et al. 2022).

    `compute()` returns that mean; `recovered(threshold)` the share of true features matched above it.
    """

    full_state_update = True
    true_features: Tensor  # buffer
    scores: Tensor

    def __init__(self, true_features: Float[Tensor, "n_features d_in"], **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("true_features", true_features.float().clone())
        self.add_state("scores", torch.zeros(true_features.shape[0]), dist_reduce_fx="mean")

    def update(self, W_dec: Float[Tensor, "d_sae d_in"]) -> None:
        self.scores = max_cosine(self.true_features.to(W_dec.device), W_dec)

    def compute(self) -> Tensor:
        return self.scores.mean()

    def recovered(self, threshold: float = 0.9) -> float:
        return float((self.scores > threshold).float().mean())
