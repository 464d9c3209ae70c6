"""Synthetic activations with known ground truth: sparse features in superposition.

x = Σ_i a_i · m_i · d_i + σ·ε, with n_features unit directions d_i in R^{d_in} (n_features > d_in, so
they are in superposition), Bernoulli activity a_i with power-law frequencies p_i ∝ (i+1)^(−α)
scaled so that E[Σ a_i] = mean_active, magnitudes m_i ~ U(0.5, 1.5), and `n_parents` parent/child
groups: a child can fire only when its parent fires (the hierarchy that invites feature absorption,
Chanin et al. 2024). Each batch is a pure function of (seed, batch index), so a resumed run sees
exactly the batches an uninterrupted run would, and the ranks of a DDP run read distinct batches.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from jaxtyping import Float
from torch import Tensor
from torch.utils.data import DataLoader

from saelab.data.stream import NORM_SAMPLE_ROWS, BatchStream, StreamPosition, norm_scale


class SyntheticFeatures:
    """The generative model: directions, frequencies and the parent → children map."""

    def __init__(
        self,
        d_in: int,
        n_features: int,
        mean_active: float = 8.0,
        power: float = 0.8,
        n_parents: int = 8,
        children_per_parent: int = 3,
        child_prob: float = 0.4,
        noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        if d_in is None or d_in < 1:
            raise ValueError(f"synthetic data needs a positive width, got d_in={d_in!r}: set data.d_in.")
        if n_features is None or n_features < 1:
            raise ValueError(
                f"synthetic data needs n_features >= 1, got {n_features!r}: set data.n_features."
            )
        if n_parents * (1 + children_per_parent) > n_features:
            raise ValueError(
                f"n_parents*(1+children_per_parent)={n_parents * (1 + children_per_parent)} exceeds "
                f"n_features={n_features}."
            )
        self.d_in, self.n_features, self.noise, self.seed = d_in, n_features, noise, seed
        # salted so the ground truth never coincides with an SAE initialised from the same seed
        g = torch.Generator().manual_seed(seed * 7919 + 104_729)
        d = torch.randn(n_features, d_in, generator=g)
        self.directions: Float[Tensor, "n_features d_in"] = d / d.norm(dim=1, keepdim=True)
        p = (torch.arange(n_features, dtype=torch.float64) + 1) ** (-power)
        self.freq = (p / p.sum() * mean_active).clamp(max=1.0).float()
        # parents are the most frequent features; each gets children from the tail of the list
        self.parent_of = torch.full((n_features,), -1, dtype=torch.long)
        for j in range(n_parents):
            for c in range(children_per_parent):
                child = n_features - 1 - (j * children_per_parent + c)
                self.parent_of[child] = j
        self.child_prob = child_prob
        self.is_child = self.parent_of >= 0

    def sample(self, n: int, index: int) -> tuple[Float[Tensor, "n d_in"], Float[Tensor, "n n_features"]]:
        """Batch number `index` (any integer; negative ones are reserved for validation)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + index * 2_654_435_761) % (2**63 - 1))
        u = torch.rand(n, self.n_features, generator=g)
        active = u < self.freq
        # a child fires with probability child_prob, and only where its parent fires
        children = self.is_child.nonzero(as_tuple=True)[0]
        parent_active = active[:, self.parent_of[children]]
        active[:, children] = parent_active & (u[:, children] < self.child_prob)
        mags = 0.5 + torch.rand(n, self.n_features, generator=g)
        coeffs = active.float() * mags
        x = coeffs @ self.directions
        if self.noise != 0:  # nan noise is honoured too (it is how the NaN-loss path is tested)
            x = x + self.noise * torch.randn(n, self.d_in, generator=g)
        return x, coeffs


class SyntheticDataModule(StreamPosition, pl.LightningDataModule):
    """Activation source over `SyntheticFeatures`; yields {"acts": [batch_size, d_in]} batches.

    Global batch g is `features.sample(batch_size, g)`; rank r of W at step s trains on g = s·W + r
    (`saelab.data.stream`), from the trainer's global step on (the data position is in every checkpoint).
    Validation reads batches −val_batches..−1, which training never reaches. `true_features` exposes the
    ground-truth directions for feature-recovery metrics.

    Args:
        d_in, n_features, mean_active, power, n_parents, children_per_parent, child_prob, noise, seed:
            the generative model (`SyntheticFeatures`).
        batch_size: rows per batch.
        val_batches: batches per validation pass.
        normalize: scale inputs by s with E‖s·x‖² = d_in (fit on the first `NORM_SAMPLE_ROWS` training rows).
    """

    def __init__(
        self,
        d_in: int = 64,
        n_features: int = 256,
        batch_size: int = 1024,
        mean_active: float = 4.0,
        power: float = 0.8,
        n_parents: int = 8,
        children_per_parent: int = 3,
        child_prob: float = 0.4,
        noise: float = 0.0,
        val_batches: int = 4,
        seed: int = 0,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.d_in, self.batch_size, self.val_batches = d_in, batch_size, val_batches
        self.features = SyntheticFeatures(
            d_in, n_features, mean_active, power, n_parents, children_per_parent, child_prob, noise, seed
        )
        self.normalize = bool(normalize)
        self.act_scale = 1.0
        if self.normalize:
            n = -(-NORM_SAMPLE_ROWS // batch_size)
            self.act_scale = norm_scale(torch.cat([self._batch(g)["acts"] for g in range(n)]), d_in)

    @property
    def true_features(self) -> Float[Tensor, "n_features d_in"]:
        return self.features.directions

    def _batch(self, g: int) -> dict[str, Tensor]:
        return {"acts": self.features.sample(self.batch_size, g)[0]}

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self._batch, self.act_scale)

    def val_dataloader(self) -> DataLoader:
        val = BatchStream(self._batch, start=-self.val_batches, stop=0, act_scale=self.act_scale)
        return DataLoader(val, batch_size=None)
