"""Latent ablation on a recommender's user representation: zero or boost one SAE latent and re-rank.

RecSAE (arXiv:2411.06112): manipulating a concept latent should change the recommendations in the
direction of its concept. For user vectors u with codes z = f(u) and a latent j:

    zero:  z'_j = 0              boost:  z'_j = max(z_j, value)
    u'   = u + (D(z') − D(z))    (keep_error: the SAE's reconstruction error stays in place)
    u'   = D(z')  vs  D(z)       (keep_error=False: both sides are reconstructions)

with D(z) = z W_dec + b_dec. Both u and u' are scored against every item; the effect is the change in
the share of the top-K recommended items that carry the concept, per user,
    Δ_u = share_K(u') − share_K(u),
tested with a two-sided paired t-test over users (scipy `ttest_rel`; the paper's `sig_test` is a
t-test at α = 0.05). When every Δ_u is 0 the test is undefined and p = 1 is reported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Bool, Float, Int
from scipy import stats
from torch import Tensor

from saelab.hosts.ranking import top_k_items


@torch.no_grad()
def ablate_latent(
    sae,
    reps: Float[Tensor, "n d_in"],
    latent: int,
    score_fn: Callable[[Tensor], Tensor],
    concept_items: Bool[Tensor, " n_items_1"],
    mode: str = "zero",
    value: float | None = None,
    k: int = 10,
    exclude: Bool[Tensor, "n n_items_1"] | None = None,
    keep_error: bool = True,
    alpha: float = 0.05,
) -> dict:
    """Effect of zeroing / boosting `latent` on the share of concept items in each top-k list.

    Returns n_users, share_before, share_after, delta (mean Δ_u), t, p_value, significant (p < alpha
    and Δ ≠ 0), frac_changed (users whose top-k list changed) and per-user `deltas`.
    """
    if mode not in ("zero", "boost"):
        raise ValueError(f"ablation mode must be 'zero' or 'boost', got {mode!r}.")
    if mode == "boost" and value is None:
        raise ValueError("boost ablation needs a value (e.g. the latent's typical activation).")
    if not 0 <= latent < sae.d_sae:
        raise ValueError(f"latent {latent} is out of range 0..{sae.d_sae - 1}.")
    reps = reps.to(sae.W_dec.dtype)
    z = sae.encode(reps)  # (n, d_sae)
    z2 = z.clone()
    z2[:, latent] = 0.0 if mode == "zero" else z[:, latent].clamp_min(float(value))
    base = reps if keep_error else sae.decode(z)
    # D(z') − D(z) only differs in latent j: (z'_j − z_j)·W_dec[j], exactly 0 where nothing changed
    moved = base + (z2[:, latent] - z[:, latent])[:, None] * sae.W_dec[latent][None]
    before = top_k_items(score_fn(base), k, exclude)  # (n, k)
    after = top_k_items(score_fn(moved), k, exclude)
    concept_items = concept_items.to(before.device)
    share_b = concept_items[before].float().mean(1)
    share_a = concept_items[after].float().mean(1)
    deltas = share_a - share_b
    changed = (before.sort(1).values != after.sort(1).values).any(1)
    if len(deltas) >= 2 and bool((deltas != 0).any()):
        t, p = stats.ttest_rel(share_a.numpy(), share_b.numpy())
        t, p = float(t), float(p)
    else:
        t, p = 0.0, 1.0
    return {
        "latent": int(latent),
        "mode": mode,
        "n_users": int(len(deltas)),
        "share_before": float(share_b.mean()) if len(deltas) else float("nan"),
        "share_after": float(share_a.mean()) if len(deltas) else float("nan"),
        "delta": float(deltas.mean()) if len(deltas) else 0.0,
        "t": t,
        "p_value": p,
        "significant": bool(p < alpha and float(deltas.mean() if len(deltas) else 0) != 0),
        "frac_changed": float(changed.float().mean()) if len(deltas) else 0.0,
        "deltas": deltas,
    }


def concept_item_mask(
    item_attrs: Bool[Tensor, "n_items_1 n_attrs"], attrs: Int[Tensor, " m"] | list[int]
) -> Tensor:
    """Items that carry any of `attrs`."""
    idx = torch.as_tensor(attrs, dtype=torch.long)
    return item_attrs[:, idx].any(1)
