"""One latent edit for every host: add, zero, clamp, set or scale chosen SAE latents at the hook.

For hook activations h (any leading shape, last axis d_in), an SAE trained on s·h (s: the source's
`act_scale`), chosen latents S with codes f = encode(s·h):

    add:    f'_S = f_S + α            (h' = h + Σ_S α_j W_dec[j] / s, no encode: activation steering)
    zero:   f'_S = 0
    clamp:  f'_S = max(f_S, v)        (at least v: steering, RecSAE's "boost")
    set:    f'_S = v
    scale:  f'_S = c · f_S
    h'    = h + (f'_S − f_S) W_dec[S] / s

The SAE's error stays in place (h' − decode(f')/s = h − decode(f)/s, the decoder being linear), so the
only change is the edited latents' share of the reconstruction; an edit that changes nothing (no latents,
add 0, clamp at 0 on non-negative codes, scale 1) returns h exactly. "add" is the steering of Templeton et
al. (2024, "Scaling Monosemanticity") and Turner et al. (arXiv:2308.10248) with an SAE decoder row as the
vector: α is in SAE units (α·W_dec[j] is what a code of α on latent j decodes to), and the change does
not depend on h, so it is added as is, never through `encode`. `LatentEdit` is the function a host's
`spliced(fn)` takes (text, protein and recommender hosts alike); `delta_from_codes` gives the same change
from codes already computed, which for the linear modes (zero, scale) commutes with mean pooling:
SHIFT's pooled ablation is the pooled splice, exactly.

Users: SHIFT, SCR and TPP (`saelab.analysis.shift`, `saelab.eval.scr`: zero), protein steering
(`saelab.analysis.protein_steering`: clamp or set, Villegas Garcia & Ansuini, arXiv:2502.09135) and RecSAE
latent ablation (`saelab.analysis.ablation`: zero or clamp, arXiv:2411.06112); text steering and
generation (`saelab.analysis.lens.steer`, `CausalLMHost.generate`: add).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

MODES = ("zero", "clamp", "set", "scale", "add")


class LatentEdit:
    """Edit latents `latents` of `sae` at the hook; call it on the hook output h (see module docstring).

    Args:
        sae: the SAE (anything with `encode` and `W_dec`), trained on activations scaled by `scale`.
        latents: the latents S to edit (an empty list: the identity).
        mode: "add" (h ← h + α·W_dec[S]/s), "zero", "clamp" (f_S ← max(f_S, v)), "set" (f_S ← v) or
            "scale" (f_S ← c·f_S).
        value: α (SAE units) for add, v (SAE units) for clamp/set, c for scale; one per latent or one for
            all; unused by zero.
        scale: the activation scale s the SAE was trained with.

    `positions` ([..., seq] bool, same leading shape as h without d_in) limits the edit to those positions;
    None edits every position.
    """

    def __init__(
        self,
        sae,
        latents: Sequence[int],
        mode: str = "zero",
        value: Sequence[float] | float | Tensor | None = None,
        scale: float = 1.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"latent edit mode must be one of {', '.join(MODES)}; got {mode!r}.")
        if mode != "zero" and value is None:
            raise ValueError(
                f"a {mode!r} edit needs a value (add: the amount α; clamp/set: the target activation; "
                "scale: the factor)."
            )
        self.sae, self.mode, self.scale = sae, mode, float(scale)
        self.latents = torch.as_tensor(list(latents), dtype=torch.long)
        d_sae = int(sae.W_dec.shape[0])
        bad = [int(j) for j in self.latents if not 0 <= int(j) < d_sae]
        if bad:
            raise ValueError(f"latents {bad} are out of range 0..{d_sae - 1}.")
        v = torch.as_tensor(0.0 if value is None else value, dtype=torch.float32)
        self.values = v.expand(len(self.latents)) if v.ndim == 0 else v.flatten()
        if self.values.shape != self.latents.shape:
            raise ValueError(f"{len(self.latents)} latents but {self.values.numel()} edit values.")
        self.positions: Tensor | None = None

    def edited(self, f: Float[Tensor, "n s"]) -> Float[Tensor, "n s"]:
        """f'_S from f_S (the chosen latents' codes, in the order of `latents`)."""
        v = self.values.to(f)
        if self.mode == "add":
            return f + v
        if self.mode == "zero":
            return torch.zeros_like(f)
        if self.mode == "clamp":
            return torch.maximum(f, v)
        if self.mode == "set":
            return v.expand_as(f).clone()
        return f * v

    @torch.no_grad()
    def delta_from_codes(self, codes: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        """The change in h, (f'_S − f_S) W_dec[S] / s, from the SAE codes f of s·h."""
        idx = self.latents.to(codes.device)
        W = self.sae.W_dec.detach()
        if not len(idx):
            return codes.new_zeros(*codes.shape[:-1], W.shape[1])
        if self.mode == "add":  # the same vector everywhere, whatever the codes
            return self._added().to(codes.device).expand(*codes.shape[:-1], -1)
        f = codes[..., idx].to(W.dtype)
        out = (self.edited(f) - f) @ W[idx.to(W.device)].to(f.device)
        return out / self.scale

    @torch.no_grad()
    def _added(self) -> Float[Tensor, " d_in"]:
        """Σ_S α_j W_dec[j] / s: the add mode's change, the same at every position."""
        W = self.sae.W_dec.detach()
        return self.values.to(W) @ W[self.latents.to(W.device)] / self.scale

    @torch.no_grad()
    def delta(self, h: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """The change the edit makes to hook activations h (zero outside `positions`)."""
        if not len(self.latents):
            return torch.zeros_like(h)
        W = self.sae.W_dec
        x = h.reshape(-1, h.shape[-1]).to(W.device, W.dtype)
        if self.mode == "add":
            d = self._added().expand_as(x)
        else:
            d = self.delta_from_codes(self.sae.encode(x * self.scale))
        if self.positions is not None:
            d = d * self.positions.reshape(-1, 1).to(d)
        return d.reshape(h.shape).to(h.device, h.dtype)

    def __call__(self, h: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        if not len(self.latents):
            return h
        return h + self.delta(h)

    def __repr__(self) -> str:
        v = "" if self.mode == "zero" else f", value={self.values.tolist()}"
        return f"LatentEdit({self.mode}, latents={self.latents.tolist()}{v}, scale={self.scale:g})"
