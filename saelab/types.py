"""Step input/output dataclasses shared by the three axes (SAE, data, objective).

They live outside the axis packages so that `saelab.sae` and `saelab.objectives` can both speak of
them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass(frozen=True)
class SparseCodes:
    """Non-zero latents of a batch in coordinate form, sorted by row.

    TopK-family activations produce these so that decoding and the encoder backward touch only the
    `nnz` selected entries instead of a dense [batch, d_sae] product.
    """

    rows: Int[Tensor, " nnz"]
    cols: Int[Tensor, " nnz"]
    vals: Float[Tensor, " nnz"]
    offsets: Int[Tensor, " batch"]  # start of each row's entries in rows/cols/vals (EmbeddingBag layout)

    @property
    def nnz(self) -> int:
        return self.vals.numel()


@dataclass(frozen=True)
class SAEOutput:
    """What one SAE forward returns; loss terms and metrics read only this and the SAE's weights.

    Dense activations fill `dense`; TopK-family activations fill `sparse`, and the dense view `codes`
    is then built on first access (differentiably), so a loss that never reads it pays nothing.
    """

    x: Float[Tensor, "batch d_in"]  # the input
    x_hat: Float[Tensor, "batch d_in"]  # reconstruction
    pre_acts: Float[Tensor, "batch d_sae"]  # encoder pre-activations; detached on the sparse path
    dense: Float[Tensor, "batch d_sae"] | None = None
    sparse: SparseCodes | None = None
    d_sae: int | None = None
    target: Float[Tensor, "batch d_in"] | None = None  # what x_hat should match when it is not x

    @property
    def y(self) -> Tensor:
        """The reconstruction target: x, unless the SAE says otherwise."""
        return self.x if self.target is None else self.target

    @cached_property
    def codes(self) -> Float[Tensor, "batch d_sae"]:
        """Latent activations as a dense [batch, d_sae] tensor."""
        if self.dense is not None:
            return self.dense
        assert self.sparse is not None and self.d_sae is not None
        out = self.x_hat.new_zeros(self.x.shape[0], self.d_sae)
        return out.index_put((self.sparse.rows, self.sparse.cols), self.sparse.vals)

    @property
    def l0(self) -> Float[Tensor, " batch"]:
        """Number of non-zero latents per row."""
        if self.sparse is not None:
            counts = torch.zeros(self.x.shape[0], device=self.x.device)
            return counts.index_add_(0, self.sparse.rows, (self.sparse.vals != 0).float())
        return (self.codes != 0).float().sum(-1)


@dataclass(frozen=True)
class TrainState:
    """Training-time context a loss term may need; built by `LitSAE` each step."""

    step: int = 0
    seed: int = 0
    dead_mask: Bool[Tensor, " d_sae"] | None = None  # latents that have not fired within the dead window
    extras: dict = field(default_factory=dict)

    def generator(self, device: torch.device | str = "cpu", salt: int = 0) -> torch.Generator:
        """A generator seeded by (seed, step, salt): random terms stay reproducible across resume."""
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + self.step * 7919 + salt) % (2**63 - 1))
        return g
