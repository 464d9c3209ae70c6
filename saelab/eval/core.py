"""The reconstruction evaluator `core`: L0, FVU / explained variance, dead fraction, latent density.

Dictionary geometry (`geometry`, `composition`, `unique_features`) is in `saelab.eval.geometry`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saelab.analysis import plots
from saelab.eval.base import EvalResult, batch_acts, fired_counts, take
from saelab.eval.metrics import FVU, L0, DeadFraction
from saelab.types import SAELike

_LOCAL = {"sync_on_compute": False}  # evaluation runs in one process, also after a DDP fit


class Core:
    """Streams held-out batches through the SAE: `l0`, `fvu`, `explained_variance`, `dead_frac`, `n_tokens`.

    Formulas in `saelab.eval.metrics` (FVU over the whole set, the SAELens definition; a latent is dead
    here when it fires on none of the evaluated tokens). Writes `density.png` (log10 firing frequency per
    latent) and keeps the per-latent density in `data["density"]`.

    Args:
        n_batches: held-out batches to read (None: the whole validation loader).
        split: "val" reads `source.val_dataloader()`.
        plot: write the density histogram.
    """

    name = "core"
    needs = ("val_dataloader",)

    def __init__(self, n_batches: int | None = None, plot: bool = True) -> None:
        self.n_batches, self.plot = n_batches, bool(plot)

    @torch.no_grad()
    def __call__(self, sae: SAELike, source: Any, out_dir: Path) -> EvalResult:
        l0, fvu, dead = L0(**_LOCAL), FVU(sae.d_in, **_LOCAL), DeadFraction(sae.d_sae, **_LOCAL)
        dev = sae.W_dec.device
        for batch in take(source.val_dataloader(), self.n_batches):
            x = batch_acts(batch).to(dev)
            out = sae(x)
            l0.update(out.l0)
            fvu.update(out.x, out.x_hat)
            dead.update(fired_counts(out, sae.d_sae), x.shape[0])
        if int(dead.n) == 0:
            raise ValueError("the core evaluator got no held-out activations: the validation split is empty.")
        f = float(fvu.compute())
        density = dead.density().float()
        res = EvalResult(
            metrics={
                "l0": float(l0.compute()),
                "fvu": f,
                "explained_variance": 1 - f,
                "dead_frac": float(dead.compute()),
                "n_tokens": int(dead.n),
            },
            data={"density": density.tolist()},
            objects={"density": density},
        )
        if self.plot:
            res.figures["latent density"] = plots.density_histogram(density, Path(out_dir) / "density.png")
        return res
