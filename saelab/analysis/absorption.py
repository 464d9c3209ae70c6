"""Feature absorption measured against ground truth on the synthetic source.

Chanin et al. 2024 (arXiv:2409.14507) describe absorption: when a child feature implies its parent
(e.g. "starts with S" ⊂ "short"), a sparse SAE saves L0 by letting the child's latent absorb the parent
direction, so the parent latent goes silent exactly where the child fires. With known parents and
children we can measure it directly. For each parent p, let ℓ_p = argmax_i cos(W_dec,i, d_p) be its
latent, A the tokens where p and one of its children fire, and B the tokens where p fires with no child:

    absorption_p = max(0, 1 − P(f_ℓp > 0 | A) / P(f_ℓp > 0 | B))

0 means the parent latent fires as reliably alongside a child as alone; 1 means it never fires there.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


@torch.no_grad()
def synthetic_absorption(
    codes: Float[Tensor, "n d_sae"],
    true_coeffs: Float[Tensor, "n n_features"],
    W_dec: Float[Tensor, "d_sae d_in"],
    directions: Float[Tensor, "n_features d_in"],
    parent_of: Tensor,
) -> dict:
    """Mean absorption over parents (see module docstring), with per-parent values and match cosines."""
    Wn = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-8)
    Dn = directions.float() / directions.float().norm(dim=1, keepdim=True)
    active = true_coeffs > 0
    per_parent, cosines = [], []
    for p in sorted(set(parent_of[parent_of >= 0].tolist())):
        children = (parent_of == p).nonzero(as_tuple=True)[0]
        sims = Wn @ Dn[p]
        latent = int(sims.argmax())
        child_on = active[:, children].any(1)
        a = active[:, p] & child_on
        b = active[:, p] & ~child_on
        if a.sum() == 0 or b.sum() == 0:
            continue
        fires = codes[:, latent] > 0
        rate_a, rate_b = fires[a].float().mean(), fires[b].float().mean()
        per_parent.append(float((1 - rate_a / rate_b).clamp(min=0)) if rate_b > 0 else 1.0)
        cosines.append(float(sims[latent]))
    mean = sum(per_parent) / len(per_parent) if per_parent else float("nan")
    return {"absorption": mean, "per_parent": per_parent, "parent_match_cos": cosines}
