"""Residual ("boosted") SAE: a small SAE trained on a frozen base SAE's error.

SAE Boost (Koriagin et al. 2025, arXiv:2507.12990): e = x − x̂_base(x); the residual SAE reads the
original x and predicts e with no decoder bias, ê = σ(x W_enc + b_enc) W_dec; the combined output is
x̂ = x̂_base(x) + ê(x). Reconstruction terms on (x, x̂) then equal terms on (e, ê).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from saelab.sae.model import SAE
from saelab.types import SAEOutput


class ResidualSAE(nn.Module):
    """Frozen `base` SAE plus a trainable residual SAE; forward returns the summed reconstruction.

    Args:
        base: the frozen SAE (from config: `sae.base.path=<export dir>`, read by `saelab.io.load_sae`).
        residual: the residual SAE; built with `apply_b_dec_to_input=False` and its b_dec frozen at 0.
    """

    def __init__(self, base: SAE, residual: SAE) -> None:
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(
                f"ResidualSAE needs the base SAE itself, got {type(base).__name__}; from config set "
                "sae.base.path=<export dir> (conf/sae/residual.yaml loads it with saelab.io.load_sae)."
            )
        if base.d_in != residual.d_in:
            raise ValueError(f"base SAE d_in={base.d_in} differs from residual d_in={residual.d_in}.")
        self.base = base.eval().requires_grad_(False)
        self.residual = residual
        residual.apply_b_dec_to_input = False
        with torch.no_grad():
            residual.b_dec.zero_()
        residual.b_dec.requires_grad_(False)
        residual.b_dec_initialized.fill_(True)
        self.d_in, self.d_sae = residual.d_in, residual.d_sae

    # the residual's weights are the trainable dictionary; loss terms and exports address them
    @property
    def W_enc(self) -> Tensor:
        return self.residual.W_enc

    @property
    def b_enc(self) -> Tensor:
        return self.residual.b_enc

    @property
    def W_dec(self) -> Tensor:
        return self.residual.W_dec

    @property
    def b_dec(self) -> Tensor:
        return self.residual.b_dec

    @property
    def activation(self) -> nn.Module:
        return self.residual.activation

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # the base keeps its inference threshold
        return self

    def encode_pre(self, x: Tensor, latents: Tensor | None = None) -> Tensor:
        return self.residual.encode_pre(x, latents)

    def forward(self, x: Float[Tensor, "batch d_in"]) -> SAEOutput:
        with torch.no_grad():
            base_hat = self.base(x).x_hat
        r = self.residual(x)
        return SAEOutput(
            x=r.x,
            x_hat=base_hat + r.x_hat,
            pre_acts=r.pre_acts,
            dense=r.dense,
            sparse=r.sparse,
            d_sae=r.d_sae,
        )

    def encode(self, x: Tensor) -> Tensor:
        return self.residual.encode(x)

    def set_decoder_norm_to_unit(self) -> None:
        self.residual.set_decoder_norm_to_unit()

    def remove_parallel_decoder_grad(self) -> None:
        self.residual.remove_parallel_decoder_grad()

    def init_b_dec(self, x: Tensor) -> None:  # the residual has no decoder bias
        pass
