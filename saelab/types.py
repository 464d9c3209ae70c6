"""Step input/output dataclasses and the protocols shared by the three axes (SAE, data, objective).

They live outside the axis packages so that `saelab.sae`, `saelab.objectives`, `saelab.eval` and the
hosts can all speak of them without importing each other. `SAELike` is what an evaluator, a loss term or
an exporter may rely on in "an SAE"; `HostLike` is what every frozen host model offers.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn


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

    def generator(self, device: torch.device | str = "cpu", salt: int = 0) -> torch.Generator:
        """A generator seeded by (seed, step, salt): random terms stay reproducible across resume."""
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + self.step * 7919 + salt) % (2**63 - 1))
        return g


@runtime_checkable
class SAELike(Protocol):
    """An SAE as the rest of saelab sees it (`saelab.sae.SAE`, `ResidualSAE`, evaluation views).

    Weights in SAELens orientation: W_enc [d_in, d_sae], W_dec [d_sae, d_in]. `activation` and
    `encode_pre` are what loss terms read (the JumpReLU step for `l0`, dead-latent pre-activations for
    `auxk`).
    """

    d_in: int
    d_sae: int

    @property
    def W_enc(self) -> Tensor: ...

    @property
    def b_enc(self) -> Tensor: ...

    @property
    def W_dec(self) -> Tensor: ...

    @property
    def b_dec(self) -> Tensor: ...

    @property
    def activation(self) -> nn.Module: ...

    def __call__(self, x: Tensor) -> SAEOutput: ...

    def encode(self, x: Tensor) -> Tensor: ...

    def encode_pre(self, x: Tensor, latents: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class HostLike(Protocol):
    """A frozen foundation model with a hook point: its activations there, and a splice context.

    `spliced(fn)` is a context manager under which the host's forward uses fn(h) in place of the hook
    output h (for CE/KL, sequence recovery, HR/NDCG, steering and ablation).
    """

    @property
    def d_in(self) -> int: ...  # a property, so hosts that read it from the loaded model qualify

    def spliced(self, fn: Callable[[Tensor], Tensor]) -> AbstractContextManager[Any]: ...
