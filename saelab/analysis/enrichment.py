"""Annotation enrichment of SAE latents: 2×2 counts, one-sided Fisher tests, Benjamini–Hochberg.

Villegas Garcia & Ansuini (arXiv:2502.09135) count, for each latent j, annotation a and activation
threshold τ, the residues where f_j > τ among annotated and non-annotated residues. With N residues,
K_a annotated ones, n_j(τ) active ones and k_ja(τ) active *and* annotated:

                  annotated      not annotated
    active        k              n − k
    inactive      K − k          N − K − n + k

The one-sided Fisher exact test for enrichment (odds ratio > 1) has p = P(X ≥ k) for X ~
Hypergeometric(N, K, n), i.e. `hypergeom.sf(k − 1, N, K, n)`, which is vectorised over every
(τ, a, j) at once. Benjamini–Hochberg (1995) controls the FDR over all latent × annotation tests at
each threshold: q_(i) = min_{m ≥ i} p_(m)·M/m over the M sorted p-values. Each pair also gets
precision = k/n = P(annotated | active), recall = k/K = P(active | annotated), and F1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Bool, Float
from scipy.stats import hypergeom
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def fisher_greater(k, n_active, n_pos, n_total) -> np.ndarray:
    """One-sided (enrichment) Fisher exact p-values, P(X ≥ k), X ~ Hypergeom(n_total, n_pos, n_active); broadcasts."""
    k, n_active, n_pos = (np.asarray(v, dtype=np.int64) for v in (k, n_active, n_pos))
    return hypergeom.sf(k - 1, n_total, n_pos, n_active)


def benjamini_hochberg(p) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) over all entries of `p` (any shape)."""
    p = np.asarray(p, dtype=np.float64)
    flat = p.ravel()
    m = flat.size
    if m == 0:
        return p.copy()
    order = np.argsort(flat, kind="stable")
    ranked = flat[order] * m / np.arange(1, m + 1)
    # step-up: q_(i) = min over the larger p-values, so take a running minimum from the top
    q_sorted = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    q = np.empty(m)
    q[order] = q_sorted
    return q.reshape(p.shape)


@dataclass
class EnrichmentCounts:
    """The 2×2 margins for every threshold, annotation and latent (see module docstring)."""

    thresholds: list[float]
    names: list[str]
    n_total: int
    n_pos: np.ndarray  # [n_labels] annotated residues
    active: np.ndarray  # [n_thresholds, d_sae] residues with f_j > τ
    active_pos: np.ndarray  # [n_thresholds, n_labels, d_sae] of those, annotated


@torch.no_grad()
def count_contingency(
    chunks: Iterable[tuple[Float[Tensor, "n d_sae"], Bool[Tensor, "n n_labels"]]],
    thresholds: Sequence[float],
    names: Sequence[str],
) -> EnrichmentCounts:
    """Accumulate the counts over (codes, labels) chunks of residues."""
    active = active_pos = n_pos = None
    n_total = 0
    for codes, labels in chunks:
        lab = labels.to(torch.float64)
        per_t, per_t_pos = [], []
        for t in thresholds:
            on = (codes > t).to(torch.float64)  # [n, d_sae]
            per_t.append(on.sum(0))
            per_t_pos.append(lab.T @ on)  # [n_labels, d_sae]
        a, ap, npos = torch.stack(per_t), torch.stack(per_t_pos), lab.sum(0)
        active = a if active is None else active + a
        active_pos = ap if active_pos is None else active_pos + ap
        n_pos = npos if n_pos is None else n_pos + npos
        n_total += codes.shape[0]
    if active is None or active_pos is None or n_pos is None:
        raise ValueError("no residues were given to count enrichment on.")
    return EnrichmentCounts(
        list(map(float, thresholds)),
        list(names),
        n_total,
        n_pos.round().long().numpy(),
        active.round().long().numpy(),
        active_pos.round().long().numpy(),
    )


@dataclass
class EnrichmentResult:
    """Counts plus p-values, BH q-values, precision, recall and F1 per (threshold, annotation, latent)."""

    counts: EnrichmentCounts
    pvalues: np.ndarray
    qvalues: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray

    @property
    def names(self) -> list[str]:
        return self.counts.names

    @property
    def thresholds(self) -> list[float]:
        return self.counts.thresholds

    def n_significant(self, alpha: float = 0.05) -> np.ndarray:
        """[n_thresholds, n_labels] number of latents with q < alpha."""
        return (self.qvalues < alpha).sum(-1)

    def ranked(
        self, annotation: str, t: int = 0, alpha: float = 0.05, by: str = "f1", min_support: int = 1
    ) -> list[int]:
        """Latents that pass FDR `alpha` for `annotation` at threshold index t, best first.

        `by="f1"` ranks by F1 of (precision, recall), then by p-value: a latent that fires on exactly
        the annotated residues has F1 = 1 and comes first. `by="precision"` ranks by P(annotated | active)
        (the most specific latents, used to steer), then by p-value. Latents active on fewer than
        `min_support` annotated residues are left out.
        """
        if by not in ("f1", "precision"):
            raise ValueError(f"rank latents by 'f1' or 'precision', not {by!r}.")
        a = self.names.index(annotation)
        score = self.f1[t, a] if by == "f1" else self.precision[t, a]
        ok = (self.qvalues[t, a] < alpha) & (self.counts.active_pos[t, a] >= min_support)
        sig = np.nonzero(ok)[0]
        return sorted(sig.tolist(), key=lambda j: (-score[j], self.pvalues[t, a, j], j))

    def top(self, annotation: str, t: int = 0, k: int = 5, alpha: float = 0.05) -> list[dict]:
        """The best k latents for an annotation with their statistics (for tables and results.json)."""
        a = self.names.index(annotation)
        c = self.counts
        return [
            {
                "latent": j,
                "precision": float(self.precision[t, a, j]),
                "recall": float(self.recall[t, a, j]),
                "f1": float(self.f1[t, a, j]),
                "p": float(self.pvalues[t, a, j]),
                "q": float(self.qvalues[t, a, j]),
                "active_annotated": int(c.active_pos[t, a, j]),
                "active": int(c.active[t, j]),
            }
            for j in self.ranked(annotation, t, alpha)[:k]
        ]


def enrichment(counts: EnrichmentCounts) -> EnrichmentResult:
    """Fisher p-values, BH q-values (one family per threshold: all latents × annotations), precision, recall."""
    k = counts.active_pos  # [T, A, d_sae]
    n_act = counts.active[:, None, :]  # [T, 1, d_sae]
    n_pos = counts.n_pos[None, :, None]  # [1, A, 1]
    p = fisher_greater(k, n_act, n_pos, counts.n_total)
    q = np.stack([benjamini_hochberg(p[t]) for t in range(p.shape[0])])
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(n_act > 0, k / np.maximum(n_act, 1), 0.0)
        recall = np.where(n_pos > 0, k / np.maximum(n_pos, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return EnrichmentResult(counts, p, q, precision, recall, f1)


def heatmap_figure(
    result: EnrichmentResult, t: int = 0, per_annotation: int = 3, alpha: float = 0.05
) -> Figure:
    """Heat map of F1 for the top latents of each annotation (rows) × annotations (columns); q ≥ alpha → 0."""
    from matplotlib.figure import Figure

    rows: list[int] = []
    for name in result.names:
        for j in result.ranked(name, t, alpha)[:per_annotation]:
            if j not in rows:
                rows.append(j)
    values = (
        np.where(result.qvalues[t] < alpha, result.f1[t], 0.0)[:, rows].T
        if rows
        else np.zeros((1, len(result.names)))
    )
    fig = Figure(figsize=(0.55 * len(result.names) + 2.5, 0.3 * max(len(rows), 1) + 2.2))
    ax = fig.subplots()
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(values.max()), 1e-6))
    ax.set_xticks(range(len(result.names)), result.names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"latent {j}" for j in rows], fontsize=7)
    ax.set_xlabel("annotation", fontsize=8)
    ax.set_ylabel(f"top {per_annotation} latents per annotation", fontsize=8)
    ax.set_title(f"F1 of enriched latents (τ = {result.thresholds[t]:g}, BH q < {alpha:g})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04).set_label("F1", fontsize=8)
    return fig


def heatmap(
    result: EnrichmentResult, path: Path, t: int = 0, per_annotation: int = 3, alpha: float = 0.05
) -> Path:
    """`heatmap_figure` written as a PNG at `path`."""
    from saelab.analysis import plots

    return plots.save(heatmap_figure(result, t, per_annotation, alpha), path)
