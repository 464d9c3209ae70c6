"""Latents read through a causal LM's output: the logit lens of decoder rows, and steering text with them.

Logit lens (nostalgebraist 2020, "interpreting GPT: the logit lens"; for SAE latents as on the SAELens and
Neuronpedia feature dashboards, Bricken et al. 2023): latent j's decoder row in the host's units,
d_j = W_dec[j] / s (s: the activation scale the SAE was trained with), read through the unembedding
W_U [vocab, d_model] as if it were the final residual stream:

    logits_j = N(d_j) W_Uᵀ,   N(d) = g ⊙ d               final RMSNorm (Llama, Mistral, Qwen, SmolLM2;
                                                          g = 1 + w for Gemma's RMSNorm)
                              N(d) = g ⊙ (d − mean(d))    final LayerNorm (GPT-2, GPT-NeoX/Pythia)
                              N(d) = d                    fold_norm=False: the raw W_dec[j] W_Uᵀ

The final norm's gain g (and LayerNorm's centring) is applied by default because every residual vector
reaches W_U only through it: W_U diag(g) is the unembedding the model actually uses, and trained models have
gains far from uniform (outlier dimensions), so the raw W_dec W_Uᵀ ranks tokens by a reading the model never
makes. This is also what the dashboards show, since they read W_U from a TransformerLens model with the
final norm folded in (`fold_ln`, `center_writing_weights`). Two parts of the norm are left out, and neither
changes which tokens a latent promotes over others: the division by the norm's scale (rms or standard
deviation of the whole residual vector, one positive number per position) and LayerNorm's bias (the same
logits whatever the latent). So logits_j is, up to that positive factor, the change in every token's logit
when latent j's code rises by one. The lens reads the direction as final-layer output; for a mid-network
hook it assumes the later blocks carry it through (the logit lens's premise), so it is sharpest late.

Steering (Turner et al., arXiv:2308.10248; with SAE latents, Templeton et al. 2024, "Scaling
Monosemanticity"): `steer` generates with and without h ← h + α·W_dec[j]/s at the hook on every position
(`saelab.edit.LatentEdit` in "add" mode, through `CausalLMHost.generate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from saelab.edit import LatentEdit
from saelab.hosts.causal_lm import CausalLMHost
from saelab.types import SAELike

# where HF causal LMs keep the norm before the unembedding, on their base model
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


@dataclass(frozen=True)
class LogitLens:
    """Top-k promoted and suppressed tokens of each latent's decoder row (see module docstring).

    Row r belongs to latent `latents[r]`; promoted tokens come highest logit first, suppressed ones
    lowest (most negative) first. `norm_applied`: whether the final norm's gain (and centring) was applied.
    """

    latents: list[int]
    promoted_ids: Int[Tensor, "n k"]
    promoted_logits: Float[Tensor, "n k"]
    promoted_tokens: list[list[str]]
    suppressed_ids: Int[Tensor, "n k"]
    suppressed_logits: Float[Tensor, "n k"]
    suppressed_tokens: list[list[str]]
    norm_applied: bool

    def record(self, latent: int) -> dict[str, Any]:
        """One latent's lens as plain data: {"promoted": [[token, logit], ...], "suppressed": [...]}."""
        r = self.latents.index(int(latent))
        return {
            "latent": int(latent),
            "norm_applied": self.norm_applied,
            "promoted": [
                [t, float(v)] for t, v in zip(self.promoted_tokens[r], self.promoted_logits[r], strict=True)
            ],
            "suppressed": [
                [t, float(v)]
                for t, v in zip(self.suppressed_tokens[r], self.suppressed_logits[r], strict=True)
            ],
        }

    def format(self, latent: int) -> str:
        """Two lines for one latent: its promoted and its suppressed tokens with their logits."""
        rec = self.record(latent)

        def line(pairs: list) -> str:
            return "  ".join(f"{t!r} {v:+.3g}" for t, v in pairs)

        return (
            f"latent {latent}\n  promoted:   {line(rec['promoted'])}\n  suppressed: {line(rec['suppressed'])}"
        )

    def __str__(self) -> str:
        return "\n".join(self.format(j) for j in self.latents)


def unembedding(host: CausalLMHost) -> Float[Tensor, "vocab d_model"]:
    """W_U of the host's model (HF `get_output_embeddings`), or a ValueError saying the host has none."""
    get = getattr(getattr(host, "model", None), "get_output_embeddings", None)
    W = getattr(get(), "weight", None) if callable(get) else None
    if not isinstance(W, Tensor) or W.ndim != 2:
        raise ValueError(
            f"the logit lens needs a host with an unembedding (a causal LM, `CausalLMHost`); "
            f"{type(host).__name__} {getattr(host, 'model_id', '')} has none."
        )
    return W.detach()


def final_norm(host: CausalLMHost) -> nn.Module | None:
    """The norm applied right before the unembedding (one of `FINAL_NORMS` on the base model), or None."""
    base = host.model.base_model
    for name in FINAL_NORMS:
        m = getattr(base, name, None)
        if isinstance(m, nn.Module):
            return m
    return None


def norm_map(norm: nn.Module) -> tuple[Float[Tensor, " d_model"], bool]:
    """(g, centre) of a final norm: N(d) = g ⊙ (d − centre·mean(d)); Gemma's RMSNorm stores g − 1."""
    w = getattr(norm, "weight", None)
    cls = type(norm).__name__
    if not isinstance(w, Tensor):
        raise ValueError(f"the final norm {cls} has no weight to fold; pass fold_norm=False.")
    g = w.detach().float()
    if cls.startswith("Gemma"):
        g = 1.0 + g
    centre = isinstance(norm, nn.LayerNorm) or ("layernorm" in cls.lower() and "rms" not in cls.lower())
    return g, centre


@torch.no_grad()
def logit_lens(
    sae: SAELike,
    host: CausalLMHost,
    latents: Sequence[int] | None = None,
    k: int = 10,
    fold_norm: bool = True,
    scale: float = 1.0,
    batch_size: int = 1024,
) -> LogitLens:
    """The top-`k` promoted and suppressed tokens of each latent's decoder row through the unembedding.

    logits_j = N(W_dec[j] / s) W_Uᵀ over the tokenizer's vocabulary (rows of W_U past `len(tokenizer)`,
    padding in some models, are left out); N is the final norm's gain (and LayerNorm's centring) when
    `fold_norm`, else the identity (module docstring). `latents`: which latents (None: all, computed
    `batch_size` rows at a time); `scale`: the SAE's activation scale s.
    """
    W_U = unembedding(host)
    if W_U.shape[1] != sae.W_dec.shape[1]:
        raise ValueError(
            f"the SAE's decoder rows have width {sae.W_dec.shape[1]} but {host.model_id}'s unembedding reads "
            f"{W_U.shape[1]}: the logit lens needs an SAE on the residual stream."
        )
    tok = host.tokenizer
    vocab = min(W_U.shape[0], len(tok))
    W_U = W_U[:vocab].float()  # (vocab, d_model)
    g, centre = torch.ones(W_U.shape[1], device=W_U.device), False
    if fold_norm:
        norm = final_norm(host)
        if norm is None:
            raise ValueError(
                f"{host.model_id} has no final norm among {', '.join(FINAL_NORMS)}; pass fold_norm=False."
            )
        g, centre = norm_map(norm)
        g = g.to(W_U.device)
    idx = list(range(sae.W_dec.shape[0])) if latents is None else [int(j) for j in latents]
    k = min(int(k), vocab)
    top_i, top_v, bot_i, bot_v = [], [], [], []
    for start in range(0, len(idx), batch_size):
        rows = torch.as_tensor(idx[start : start + batch_size], device=sae.W_dec.device)
        d = sae.W_dec.detach()[rows].to(W_U.device, torch.float32) / scale  # (c, d_model)
        if centre:
            d = d - d.mean(-1, keepdim=True)
        logits = (d * g) @ W_U.T  # (c, vocab)
        v, i = logits.topk(k, dim=-1)
        top_i.append(i.cpu())
        top_v.append(v.cpu())
        v, i = (-logits).topk(k, dim=-1)
        bot_i.append(i.cpu())
        bot_v.append(-v.cpu())
    empty = torch.zeros(0, k)
    promoted = torch.cat(top_i) if top_i else empty.long()
    suppressed = torch.cat(bot_i) if bot_i else empty.long()
    return LogitLens(
        latents=idx,
        promoted_ids=promoted,
        promoted_logits=torch.cat(top_v) if top_v else empty,
        promoted_tokens=_token_strings(tok, promoted),
        suppressed_ids=suppressed,
        suppressed_logits=torch.cat(bot_v) if bot_v else empty,
        suppressed_tokens=_token_strings(tok, suppressed),
        norm_applied=bool(fold_norm),
    )


def _token_strings(tok, ids: Int[Tensor, "n k"]) -> list[list[str]]:
    """Each id decoded on its own (" the", not the byte-level "Ġthe")."""
    flat = tok.batch_decode([[i] for i in ids.reshape(-1).tolist()])
    k = ids.shape[1]
    return [flat[r * k : (r + 1) * k] for r in range(ids.shape[0])]


def steer(
    host: CausalLMHost,
    sae: SAELike,
    latent: int | Sequence[int],
    alpha: float | Sequence[float],
    prompt: str,
    max_new_tokens: int = 32,
    scale: float = 1.0,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
) -> tuple[str, str]:
    """(unsteered, steered) continuations of `prompt`: the steered one under h ← h + α·W_dec[latent]/s
    at every position (`LatentEdit(sae, [latent], "add", alpha, scale)`), both with the same decoding and
    seed, so α = 0 gives the unsteered text exactly. Several latents (with one α each, or one for all) add up."""
    latents = [int(latent)] if isinstance(latent, int) else [int(j) for j in latent]
    edit = LatentEdit(
        sae, latents, "add", alpha if isinstance(alpha, float | int) else list(alpha), scale=scale
    )
    kw: dict[str, Any] = dict(greedy=greedy, temperature=temperature, seed=seed)
    return host.generate(prompt, max_new_tokens, **kw), host.generate(prompt, max_new_tokens, edit=edit, **kw)
