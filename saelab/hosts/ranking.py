"""Full-ranking top-K metrics for next-item recommendation (leave-one-out): HR@K and NDCG@K.

With one held-out target per user and rank r ∈ {0, 1, …} = the number of candidate items scored
strictly above the target (excluded items never count):

    HR@K   = mean_u 1[r_u < K]
    NDCG@K = mean_u 1[r_u < K] / log2(r_u + 2)

(the ideal DCG of a single relevant item is 1). This is the `--test_all 1` protocol of ReChorus,
which RecSAE (arXiv:2411.06112) uses: every item is a candidate except the user's earlier items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def target_ranks(
    scores: Float[Tensor, "batch n_items"],
    targets: Int[Tensor, " batch"],
    exclude: Bool[Tensor, "batch n_items"] | None = None,
) -> Int[Tensor, " batch"]:
    """0-based rank of each target among the non-excluded items (ties count in the target's favour)."""
    scores = scores.float()
    if exclude is not None:
        exclude = exclude.clone()
        exclude[torch.arange(len(targets)), targets] = False  # the target is always a candidate
        scores = scores.masked_fill(exclude, float("-inf"))
    t = scores.gather(1, targets[:, None])  # (batch, 1)
    return (scores > t).sum(1)


def hr_ndcg(ranks: Int[Tensor, " n"], ks: Sequence[int] = (10,)) -> dict[str, float]:
    """{"hr@K": …, "ndcg@K": …} for each K from 0-based target ranks."""
    r = ranks.double()
    out = {}
    for k in ks:
        hit = (r < k).double()
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float((hit / torch.log2(r + 2)).mean())
    return out


@torch.no_grad()
def full_ranking(
    score_fn: Callable[[Tensor], Tensor],
    inputs: Tensor,
    targets: Int[Tensor, " n"],
    exclude: Bool[Tensor, "n n_items"] | None = None,
    ks: Sequence[int] = (10,),
    batch_size: int = 512,
) -> tuple[dict[str, float], Int[Tensor, " n"]]:
    """Score `inputs` (histories or user vectors) in batches with `score_fn` → (metrics, ranks)."""
    ranks = []
    for i in range(0, len(targets), batch_size):
        sl = slice(i, i + batch_size)
        scores = score_fn(inputs[sl])
        ranks.append(target_ranks(scores, targets[sl], None if exclude is None else exclude[sl]))
    r = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    return hr_ndcg(r, ks), r


def top_k_items(
    scores: Float[Tensor, "batch n_items"], k: int, exclude: Bool[Tensor, "batch n_items"] | None = None
) -> Int[Tensor, "batch k"]:
    """The k highest-scoring non-excluded items of each row (the recommendation list)."""
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    return scores.topk(k, dim=1).indices
