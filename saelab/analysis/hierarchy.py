"""Feature hierarchy in a nested dictionary: early-group "parent" latents and the later latents under them.

Matryoshka SAEs (Bussmann et al. 2025, arXiv:2503.17547) train their first group to reconstruct alone, so
it should hold general features, while later groups refine them. For a parent latent p of the first group
and a later latent c, two signals say that c sits under p:

  decoder similarity  cos(d_p, d_c) = ⟨d_p, d_c⟩ / (‖d_p‖ ‖d_c‖), and
  co-firing           P(p fires | c fires) = #{n : f_np > 0 ∧ f_nc > 0} / #{n : f_nc > 0}.

`children` keeps, per parent, the later latents with the largest cosine among those that fire on at least
`min_count` tokens and co-fire with the parent at rate ≥ `min_cofire`; `top_tokens` gives each latent's
most strongly activating tokens so the report can show parent/child pairs as text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from jaxtyping import Float, Int
from torch import Tensor


@torch.no_grad()
def collect_codes(
    sae, batches: Iterable, max_rows: int, scale: float = 1.0
) -> tuple[Float[Tensor, "n d_sae"], Int[Tensor, " n"]]:
    """Dense codes and token ids of up to `max_rows` rows of `batches` ({"acts", "token_ids"} batches)."""
    codes, ids, n = [], [], 0
    dev = sae.W_dec.device
    for b in batches:
        if n >= max_rows:
            break
        x = (b["acts"] if isinstance(b, dict) else b)[: max_rows - n]
        codes.append(sae(x.to(dev) * scale).codes.float().cpu())
        ids.append(
            b["token_ids"][: x.shape[0]]
            if isinstance(b, dict) and "token_ids" in b
            else torch.full((x.shape[0],), -1)
        )
        n += x.shape[0]
    if not codes:
        raise ValueError("collect_codes got no batches: the validation split is empty.")
    return torch.cat(codes), torch.cat(ids).long()


def top_tokens(
    codes: Float[Tensor, "n d_sae"],
    token_ids: Int[Tensor, " n"],
    latent: int,
    decode: Callable[[int], str],
    n: int = 6,
) -> list[str]:
    """The `n` distinct tokens on which `latent` activates most (by its largest activation per token)."""
    col = codes[:, latent]
    order = col.argsort(descending=True)
    out: list[str] = []
    seen: set[int] = set()
    for i in order.tolist():
        if col[i] <= 0 or len(out) >= n:
            break
        t = int(token_ids[i])
        if t not in seen:
            seen.add(t)
            out.append(decode(t) if t >= 0 else "?")
    return out


def children(
    codes: Float[Tensor, "n d_sae"],
    W_dec: Float[Tensor, "d_sae d_in"],
    parents: list[int],
    later: range,
    n_children: int = 3,
    min_cofire: float = 0.3,
    min_count: int = 3,
) -> list[dict]:
    """Per parent: {parent, fires, children: [{latent, cos, cofire, fires}]} (formulas in the module doc)."""
    fired = (codes > 0).float()  # [n, d_sae]
    counts = fired.sum(0)
    dec = W_dec.detach().float().cpu()
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    later_idx = torch.tensor(list(later), dtype=torch.long)
    out = []
    for p in parents:
        cos = dec[later_idx] @ dec[p]  # [n_later]
        both = fired[:, p] @ fired[:, later_idx]  # tokens where parent and child both fire
        cofire = both / counts[later_idx].clamp_min(1)
        ok = (counts[later_idx] >= min_count) & (cofire >= min_cofire)
        cand = later_idx[ok]
        order = cos[ok].argsort(descending=True)[:n_children]
        kids = [
            {
                "latent": int(cand[i]),
                "cos": float(cos[ok][i]),
                "cofire": float(cofire[ok][i]),
                "fires": int(counts[cand[i]]),
            }
            for i in order.tolist()
        ]
        out.append({"parent": int(p), "fires": int(counts[p]), "children": kids})
    return out


def sample_parents(
    codes: Float[Tensor, "n d_sae"], first: int, n: int, seed: int = 0, min_count: int = 5
) -> list[int]:
    """`n` latents of [0, first) that fire on at least `min_count` rows, drawn with a seeded permutation."""
    live = ((codes[:, :first] > 0).sum(0) >= min_count).nonzero().flatten()
    if live.numel() == 0:
        return []
    g = torch.Generator().manual_seed(seed)
    pick = live[torch.randperm(live.numel(), generator=g)[:n]]
    return sorted(int(i) for i in pick)
