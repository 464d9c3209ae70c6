"""Latents by Matryoshka group: which to interpret, their scores per group, and which to steer.

The radiology-LLM Matryoshka study (methods.md §4.2–4.3) reports auto-interpretation scores per nested
group (the first, coarse latents against the later, finer ones) and steers a few latents whose meaning is
clear. Groups are index ranges [b_{g−1}, b_g) of the latents, with b the cumulative prefix sizes; the same
ranges are applied to a BatchTopK SAE as the control (its latent order carries no meaning, so its groups
should score alike).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from saelab.analysis.features import FeatureRecords
from saelab.analysis.steering import keywords_from_tokens


def group_of(latent: int, bounds: Sequence[int]) -> int:
    """The 0-based group of `latent` for cumulative group ends `bounds` (the last one is d_sae)."""
    for g, end in enumerate(bounds):
        if latent < end:
            return g
    raise ValueError(f"latent {latent} is past the last group end {bounds[-1]}.")


def latents_per_group(
    records: FeatureRecords, bounds: Sequence[int], per_group: int, seed: int = 0, min_count: int = 8
) -> dict[int, list[int]]:
    """`per_group` latents drawn (seeded) from each group among those that fired at least `min_count`
    times in the records (fewer where the group has fewer such latents)."""
    count = records.count.tolist()
    rng = random.Random(seed)
    chosen: dict[int, list[int]] = {}
    start = 0
    for g, end in enumerate(bounds):
        alive = [j for j in range(start, end) if count[j] >= min_count]
        chosen[g] = sorted(rng.sample(alive, min(per_group, len(alive))))
        start = end
    return chosen


def scores_by_group(
    rows: Sequence[Mapping[str, Any]], bounds: Sequence[int], scores: Sequence[str]
) -> tuple[tuple[list[str], list[list]], dict[int, dict[str, float]]]:
    """Mean of each score over the scored latents of each group (NaN scores left out), as a table with the
    group's latent range and count ((headers, rows)), and as {group: {score: mean}}."""
    per: dict[int, dict[str, list[float]]] = {}
    for r in rows:
        g = group_of(int(r["latent"]), bounds)
        for s in scores:
            v = r.get(s)
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                per.setdefault(g, {}).setdefault(s, []).append(float(v))
    means: dict[int, dict[str, float]] = {}
    table_rows = []
    start = 0
    for g, end in enumerate(bounds):
        n = sum(1 for r in rows if start <= int(r["latent"]) < end)
        vals = per.get(g, {})
        means[g] = {s: float(np.mean(vals[s])) if vals.get(s) else float("nan") for s in scores}
        table_rows.append([f"{g + 1}", f"{start}–{end - 1}", n, *[means[g][s] for s in scores]])
        start = end
    return (["group", "latents", "scored", *scores], table_rows), means


def clearest(rows: Sequence[Mapping[str, Any]], n: int, score: str) -> list[int]:
    """The `n` latents with the highest finite `score` (ties by latent id)."""
    scored = [
        (float(r[score]), int(r["latent"]))
        for r in rows
        if isinstance(r.get(score), (int, float)) and math.isfinite(float(r[score]))
    ]
    return [j for _, j in sorted(scored, key=lambda t: (-t[0], t[1]))[:n]]


def context_keywords(
    records: FeatureRecords, latent: int, decode: Callable[[int], str], k: int = 20
) -> list[str]:
    """Concept keywords of `latent`: the tokens it fires on most strongly (the selected token of its top
    `k` contexts), cleaned by `keywords_from_tokens` (punctuation, short words and stopwords dropped)."""
    left = int(records.window[0])
    top = records.latent(latent).top[:k]
    return keywords_from_tokens([decode(c.tokens[left]) for c in top if c.tokens[left] >= 0])
