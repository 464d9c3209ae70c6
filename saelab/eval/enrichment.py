"""`enrichment`: latent ↔ annotation statistics on labelled residues (protein SAEs, arXiv:2502.09135).

For every activation threshold τ, annotation a and latent j: a one-sided Fisher test of "j active (f_j > τ)"
against "residue annotated with a", BH-corrected over all latents × annotations per threshold, with
precision, recall and F1 (`saelab.analysis.enrichment`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.analysis.enrichment import count_contingency, enrichment, heatmap
from saelab.eval.base import EvalResult, Table
from saelab.types import SAELike


@torch.no_grad()
def code_chunks(
    sae: SAELike, acts: Tensor, labels: Tensor, chunk: int, maxima: Tensor
) -> Iterator[tuple[Tensor, Tensor]]:
    """(codes, labels) per chunk of residues; updates the per-latent maximum activation in place."""
    for s in range(0, len(acts), chunk):
        codes = sae.encode(acts[s : s + chunk].to(sae.W_dec.device)).cpu()  # [chunk, d_sae]
        torch.maximum(maxima, codes.max(0).values, out=maxima)
        yield codes, labels[s : s + chunk]


class AnnotationEnrichment:
    """Counts, tests and ranks latents for each annotation of `source` (`acts`, `labels`, `label_names`).

    Metrics: `n_sig/<annotation>` (latents with q < alpha at the headline threshold). `data["enrichment"]`
    holds every threshold's counts and the `top_k` latents per annotation; `objects` keep the full
    `EnrichmentResult` and each latent's maximum activation (the steering scale).

    Args:
        thresholds: activation thresholds τ.
        threshold_index: the τ used for rankings and the headline table.
        alpha: BH false-discovery rate.
        top_k: latents listed per annotation.
        encode_batch: residues per SAE encode.
    """

    name = "enrichment"
    needs = ("acts", "labels", "label_names")

    def __init__(
        self,
        thresholds: Sequence[float] = (0.01, 0.1, 1.0),
        threshold_index: int = 1,
        alpha: float = 0.05,
        top_k: int = 5,
        encode_batch: int = 4096,
    ) -> None:
        self.thresholds = [float(t) for t in thresholds]
        if not 0 <= int(threshold_index) < len(self.thresholds):
            raise ValueError(
                f"threshold_index {threshold_index} is outside the {len(self.thresholds)} thresholds."
            )
        self.ti, self.alpha, self.top_k, self.encode_batch = (
            int(threshold_index),
            float(alpha),
            int(top_k),
            int(encode_batch),
        )

    def __call__(self, sae: SAELike, source: Any, out_dir: Path) -> EvalResult:
        maxima = torch.zeros(sae.d_sae)
        chunks = code_chunks(sae, source.acts, source.labels, self.encode_batch, maxima)
        counts = count_contingency(chunks, self.thresholds, source.label_names)
        enr = enrichment(counts)
        n_sig = enr.n_significant(self.alpha)  # [T, A]
        rows: list[list] = []
        per_annotation: dict[str, dict] = {}
        metrics: dict[str, float] = {}
        for a, name in enumerate(enr.names):
            top = enr.top(name, self.ti, self.top_k, self.alpha)
            best = top[0] if top else None
            rows.append(
                [
                    name,
                    int(counts.n_pos[a]),
                    *[int(n_sig[t, a]) for t in range(len(self.thresholds))],
                    f"{best['latent']} (P {best['precision']:.2f}, R {best['recall']:.2f})" if best else "-",
                ]
            )
            per_annotation[name] = {
                "residues": int(counts.n_pos[a]),
                "n_significant": {f"{t:g}": int(n_sig[i, a]) for i, t in enumerate(self.thresholds)},
                "top": top,
            }
            metrics[f"n_sig/{name}"] = int(n_sig[self.ti, a])
        headers = [
            "annotation",
            "residues",
            *[f"latents q<{self.alpha:g} (τ={t:g})" for t in self.thresholds],
            "best latent",
        ]
        fig = heatmap(
            enr, Path(out_dir) / "enrichment_heatmap.png", self.ti, per_annotation=3, alpha=self.alpha
        )
        return EvalResult(
            metrics=metrics,
            tables={"annotation enrichment": Table(headers, rows)},
            figures={"enrichment heat map": fig},
            data={
                "enrichment": {
                    "thresholds": self.thresholds,
                    "headline_threshold": self.thresholds[self.ti],
                    "alpha": self.alpha,
                    "annotations": per_annotation,
                }
            },
            objects={"enrichment": enr, "max_activation": maxima},
        )
