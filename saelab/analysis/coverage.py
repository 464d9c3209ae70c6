"""Tail-concept recall: which test tokens, binned by corpus frequency, have a latent that captures them.

Specialized SAEs (Muhamed et al. 2025, arXiv:2411.00743, Figs. 2, 6, 11, 14) bin the subdomain test
tokens by corpus frequency and plot, per bin, the proportion of tokens "with SAE features". The paper does
not spell the criterion out; saelab fixes it as follows.

For test tokens n = 1..N with token ids y_n and SAE codes f_n ∈ R^{d_sae} (f ≥ 0), and a token type τ
with c_τ = #{n : y_n = τ} test occurrences:

  recall(j, τ) = #{n : y_n = τ, f_nj > 0} / c_τ           (share of τ's occurrences on which latent j fires)
  purity(j, τ) = Σ_{n: y_n = τ} f_nj / Σ_n f_nj           (share of latent j's activation mass that τ holds)

  τ is **captured** iff c_τ ≥ min_count and ∃ j with recall(j, τ) ≥ min_recall and purity(j, τ) ≥ min_purity.

A test token n is covered iff its type y_n is captured. Tokens are binned by the corpus count of their
type (`edges`, right-open, default decades 0, 1, 10, 100, ...), and each bin reports
coverage = covered tokens / tokens. The cumulative curve sorts test tokens from least to most frequent
and plots the cumulative share of covered tokens (normalised to end at 1, as in the paper) against the
cumulative share of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from saelab.types import SAELike

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def token_counts(token_ids: Iterable[Tensor] | Tensor, vocab_size: int) -> Int[Tensor, " vocab"]:
    """Occurrences of each token id in a reference corpus (one tensor or chunks of ids)."""
    chunks = [token_ids] if isinstance(token_ids, Tensor) else list(token_ids)
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for c in chunks:
        counts += torch.bincount(c.reshape(-1).long(), minlength=vocab_size)[:vocab_size]
    return counts


@torch.no_grad()
def captured_types(
    codes_batches: Iterable[tuple[Float[Tensor, "n d_sae"], Int[Tensor, " n"]]],
    min_recall: float = 0.5,
    min_purity: float = 0.2,
    min_count: int = 2,
) -> tuple[Int[Tensor, " types"], Int[Tensor, " types"], Tensor]:
    """(type ids, their test counts, captured flags) from (codes, token ids) chunks, by the module's rule."""
    rows_c, cols_c, vals_c, ids_c = [], [], [], []
    offset = 0
    d_sae = None
    for codes, ids in codes_batches:
        d_sae = codes.shape[1]
        r, c = codes.nonzero(as_tuple=True)
        rows_c.append(r + offset)
        cols_c.append(c)
        vals_c.append(codes[r, c].double())
        ids_c.append(ids.long())
        offset += codes.shape[0]
    if d_sae is None or offset == 0:
        raise ValueError("coverage needs at least one test token.")
    rows, cols, vals, ids = torch.cat(rows_c), torch.cat(cols_c), torch.cat(vals_c), torch.cat(ids_c)
    types, inv, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    n_types = types.shape[0]
    key = cols * n_types + inv[rows]  # (nnz,) flat index of (latent, type)
    fires = torch.bincount(key, minlength=d_sae * n_types).view(d_sae, n_types).double()
    mass = torch.bincount(key, weights=vals, minlength=d_sae * n_types).view(d_sae, n_types)
    recall = fires / counts.double()[None, :]
    purity = mass / mass.sum(1, keepdim=True).clamp_min(1e-30)
    ok = (recall >= min_recall) & (purity >= min_purity) & (mass > 0)
    captured = ok.any(0) & (counts >= min_count)
    return types, counts, captured


@dataclass
class Coverage:
    edges: list[float]
    bin_labels: list[str]
    bin_tokens: list[int]
    bin_coverage: list[float]
    total_coverage: float
    n_captured_types: int
    cum_x: list[float]
    cum_y: list[float]

    def to_dict(self) -> dict:
        return {
            "bins": self.bin_labels,
            "bin_tokens": self.bin_tokens,
            "coverage": self.bin_coverage,
            "total_coverage": self.total_coverage,
            "n_captured_types": self.n_captured_types,
            "cumulative": {"token_share": self.cum_x, "covered_share": self.cum_y},
        }


def _label(lo: float, hi: float) -> str:
    if hi == float("inf"):
        return f"≥{lo:g}"
    return f"{lo:g}" if hi - lo == 1 else f"{lo:g}–{hi - 1:g}"


def coverage_by_frequency(
    types: Int[Tensor, " types"],
    counts: Int[Tensor, " types"],
    captured: Tensor,
    corpus_counts: Int[Tensor, " vocab"],
    edges: Sequence[float] = (0, 1, 10, 100, 1000, 10000),
    cum_points: int = 50,
) -> Coverage:
    """Per-frequency-bin share of covered test tokens, and the cumulative curve (least frequent first)."""
    freq = corpus_counts[types].double().numpy()  # corpus count of each test type
    c = counts.double().numpy()
    cap = captured.numpy().astype(bool)
    bounds = [*map(float, edges), float("inf")]
    labels, toks, cov = [], [], []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        sel = (freq >= lo) & (freq < hi)
        n = float(c[sel].sum())
        labels.append(_label(lo, hi))
        toks.append(int(n))
        cov.append(float(c[sel & cap].sum() / n) if n > 0 else float("nan"))
    order = np.argsort(freq, kind="stable")
    cx = np.cumsum(c[order]) / c.sum()
    cy_raw = np.cumsum(c[order] * cap[order])
    cy = cy_raw / cy_raw[-1] if cy_raw[-1] > 0 else cy_raw
    pick = np.unique(np.linspace(0, len(order) - 1, min(cum_points, len(order))).round().astype(int))
    return Coverage(
        edges=[float(e) for e in edges],
        bin_labels=labels,
        bin_tokens=toks,
        bin_coverage=cov,
        total_coverage=float((c * cap).sum() / c.sum()),
        n_captured_types=int(cap.sum()),
        cum_x=[0.0, *cx[pick].tolist()],
        cum_y=[0.0, *cy[pick].tolist()],
    )


@torch.no_grad()
def sae_coverage(
    sae: SAELike,
    batches: Iterable[dict],
    corpus_counts: Int[Tensor, " vocab"],
    min_recall: float = 0.5,
    min_purity: float = 0.2,
    min_count: int = 2,
    edges: Sequence[float] = (0, 1, 10, 100, 1000, 10000),
) -> Coverage:
    """Coverage of an SAE on {"acts", "token_ids"} test batches, tokens binned by `corpus_counts`."""
    if not isinstance(sae, nn.Module):
        raise TypeError(f"sae_coverage runs a torch module SAE, got {type(sae).__name__}.")
    was = sae.training
    sae.eval()
    dev = next(sae.parameters()).device

    def chunks():
        for b in batches:
            yield sae(b["acts"].to(dev)).codes.float().cpu(), b["token_ids"]

    types, counts, captured = captured_types(chunks(), min_recall, min_purity, min_count)
    sae.train(was)
    return coverage_by_frequency(types, counts, captured, corpus_counts, edges)


def coverage_rows(covs: Mapping[str, dict]) -> tuple[list[str], list[list]]:
    """(headers, rows) of coverage per frequency bin (rows) for each SAE (columns), from `Coverage.to_dict()`
    results on the same test tokens; bins without test tokens are left out (nothing to report)."""
    first = next(iter(covs.values()))
    rows = [
        [b, n, *[c["coverage"][i] for c in covs.values()]]
        for i, (b, n) in enumerate(zip(first["bins"], first["bin_tokens"], strict=True))
        if n
    ]
    return ["corpus count", "test tokens", *covs], rows


def coverage_figure(headers: Sequence[str], rows: Sequence[Sequence], title: str) -> Figure:
    """Grouped bars of a `coverage_rows` table: one group per bin (labelled with its token count), one bar
    per SAE, each with its value written above it (a bin no SAE covers reads 0.00 rather than blank); bins
    without test tokens have no coverage and are left out."""
    from saelab.analysis import plots

    rows = [r for r in rows if r[1]]
    return plots.bars_figure(
        [f"{r[0]} ({r[1]})" for r in rows],
        {n: [r[2 + i] for r in rows] for i, n in enumerate(headers[2:])},
        "share of tokens with a capturing latent",
        title,
        xlabel="count of the token in the training corpus (test tokens in the bin)",
        value_fmt="{:.2f}",
    )


def coverage_plot(headers: Sequence[str], rows: Sequence[Sequence], path: Path, title: str) -> Path:
    """`coverage_figure` written as a PNG at `path`."""
    from saelab.analysis import plots

    return plots.save(coverage_figure(headers, rows, title), path)
