"""Ground-truth `recovery` of the true features on the synthetic source (absorption: `eval.absorption`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saelab.analysis import plots
from saelab.eval.base import EvalResult
from saelab.eval.metrics import FeatureRecovery
from saelab.types import SAELike

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class Recovery:
    """`feature_recovery` (mean over true features of the max cosine to a decoder row, Sharkey et al. 2022)
    and `frac_recovered` (share of true features matched above `threshold`); `recovery.png` shows them all.

    Needs `source.true_features` [n_features, d_in].
    """

    name = "recovery"
    needs = ("true_features",)

    def __init__(self, threshold: float = 0.9, plot: bool = True) -> None:
        self.threshold, self.plot = float(threshold), bool(plot)

    @torch.no_grad()
    def __call__(self, sae: SAELike, source: Any, out_dir: Path) -> EvalResult:
        rec = FeatureRecovery(source.true_features, sync_on_compute=False)
        rec.update(sae.W_dec)
        scores = rec.scores.float()
        res = EvalResult(
            metrics={
                "feature_recovery": float(rec.compute()),
                "frac_recovered": rec.recovered(self.threshold),
            },
            data={"recovery_scores": scores.tolist()},
        )
        if self.plot:
            fig = recovery_figure(scores.tolist(), self.threshold)
            res.figures["feature recovery"] = plots.save(fig, Path(out_dir) / "recovery.png")
        return res


def recovery_figure(scores: Sequence[float], threshold: float) -> Figure:
    """Histogram of each true feature's max cosine to a decoder row, with a dashed line at `threshold`
    (the features right of it count as recovered in `frac_recovered`)."""
    frac = sum(s > threshold for s in scores) / max(len(scores), 1)
    return plots.histogram_figure(
        scores,
        "max cos(true feature, decoder rows)",
        "Feature recovery (one count per true feature)",
        vlines={f"threshold {threshold:g}: {frac:.0%} recovered": threshold},
    )
