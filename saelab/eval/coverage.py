"""`coverage`: tail-token coverage of an SAE on held-out text, by corpus frequency (Specialized SAEs,
arXiv:2411.00743). The criterion and the binning are defined in `saelab.analysis.coverage`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saelab.analysis.coverage import coverage_plot, coverage_rows, sae_coverage, token_counts
from saelab.eval.base import EvalResult, Table
from saelab.types import SAELike


class TailCoverage:
    """Share of held-out tokens whose type some latent specifically captures, per corpus-frequency bin.

    Token types are binned by their count in the source's training split (`source.token_ids("train")`);
    the held-out batches must carry `token_ids`. Metrics: `coverage` (all tokens) and `coverage/<bin>`;
    `data["coverage"]` has the bins, their token counts and the cumulative curve; `coverage.png` plots it.

    Args:
        min_recall, min_purity, min_count: the capture rule (see `saelab.analysis.coverage`).
        edges: right-open frequency-bin edges.
    """

    name = "coverage"
    needs = ("token_ids", "host", "val_dataloader")

    def __init__(
        self,
        min_recall: float = 0.5,
        min_purity: float = 0.2,
        min_count: int = 2,
        edges: Sequence[float] = (0, 1, 10, 100, 1000, 10000),
        plot: bool = True,
    ) -> None:
        self.min_recall, self.min_purity, self.min_count = (
            float(min_recall),
            float(min_purity),
            int(min_count),
        )
        self.edges, self.plot = [float(e) for e in edges], bool(plot)

    def __call__(self, sae: SAELike, source: Any, out_dir: Path) -> EvalResult:
        counts = token_counts(source.token_ids("train"), len(source.host.tokenizer))
        cov = sae_coverage(
            sae,
            source.val_dataloader(),
            counts,
            min_recall=self.min_recall,
            min_purity=self.min_purity,
            min_count=self.min_count,
            edges=self.edges,
        ).to_dict()
        metrics = {"coverage": cov["total_coverage"]}
        metrics |= {
            f"coverage/{b}": c
            for b, c, n in zip(cov["bins"], cov["coverage"], cov["bin_tokens"], strict=True)
            if n
        }
        headers, rows = coverage_rows({"coverage": cov})
        res = EvalResult(
            metrics=metrics,
            tables={"coverage by corpus frequency": Table(headers, rows)},
            data={"coverage": cov},
        )
        if self.plot and rows:
            res.figures["coverage"] = coverage_plot(
                headers, rows, Path(out_dir) / "coverage.png", "Tail-token coverage by corpus-frequency bin"
            )
        return res
