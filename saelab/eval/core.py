"""The reconstruction evaluator `core`: L0, FVU / explained variance, dead fraction, latent density.

Dictionary geometry (`geometry`, `composition`, `unique_features`) is in `saelab.eval.geometry`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saelab.analysis import plots
from saelab.eval.base import EvalResult, batch_acts, fired_counts
from saelab.eval.metrics import FVU, L0, DeadFraction
from saelab.types import SAELike

_LOCAL = {"sync_on_compute": False}  # evaluation runs in one process, also after a DDP fit


class Core:
    """Streams held-out batches through the SAE: `l0`, `fvu`, `explained_variance`, `dead_frac`,
    `dead_window_tokens`, `n_tokens`.

    Formulas in `saelab.eval.metrics` (FVU over the whole set, the SAELens definition). L0 and FVU are
    measured on `n_batches` held-out batches (`n_tokens` rows). A latent is dead when it fires on none of
    `dead_window_tokens` tokens, the window the training counter and AuxK use (`saelab.resolvers`): firing
    is counted on the held-out split first and, where it holds fewer tokens than the window, on the
    source's training stream after it (dead is about firing, not generalisation). `dead_window_tokens` in
    the metrics is the number of tokens actually counted; when the source holds fewer than the window, a
    line says so. With `dead_window_tokens=None` firing is counted on the L0 batches only. Writes
    `density.png` (log10 firing frequency per latent over the counted tokens) and keeps the per-latent
    density in `data["density"]`.

    Args:
        n_batches: held-out batches for L0 and FVU (None: the whole validation loader).
        dead_window_tokens: tokens over which a latent must stay silent to count as dead.
        plot: write the density histogram.
    """

    name = "core"
    needs = ("val_dataloader",)

    def __init__(
        self, n_batches: int | None = None, dead_window_tokens: int | None = None, plot: bool = True
    ) -> None:
        self.n_batches, self.plot = n_batches, bool(plot)
        self.window = None if dead_window_tokens is None else int(dead_window_tokens)

    @torch.no_grad()
    def __call__(self, sae: SAELike, source: Any, out_dir: Path) -> EvalResult:
        l0, fvu, dead = L0(**_LOCAL), FVU(sae.d_in, **_LOCAL), DeadFraction(sae.d_sae, **_LOCAL)
        dev = sae.W_dec.device
        for i, batch in enumerate(source.val_dataloader()):
            measuring = self.n_batches is None or i < self.n_batches
            if not measuring and (self.window is None or int(dead.n) >= self.window):
                break
            x = batch_acts(batch).to(dev)
            out = sae(x)
            if measuring:
                l0.update(out.l0)
                fvu.update(out.x, out.x_hat)
            dead.update(fired_counts(out, sae.d_sae), x.shape[0])
        if int(fvu.n) == 0:
            raise ValueError("the core evaluator got no held-out activations: the validation split is empty.")
        if self.window is not None and int(dead.n) < self.window:
            self._count_on_train(sae, source, dead)
        counted = int(dead.n)
        if self.window is not None and counted < self.window:
            print(
                f"saelab: core: dead_frac counted over {counted:,} tokens, fewer than the dead window "
                f"({self.window:,}): the source holds no more"
            )
        f = float(fvu.compute())
        density = dead.density().float()
        res = EvalResult(
            metrics={
                "l0": float(l0.compute()),
                "fvu": f,
                "explained_variance": 1 - f,
                "dead_frac": float(dead.compute()),
                "dead_window_tokens": counted,
                "n_tokens": int(fvu.n),
            },
            data={"density": density.tolist()},
            objects={"density": density},
        )
        if self.plot:
            res.figures["latent density"] = plots.density_histogram(density, Path(out_dir) / "density.png")
        return res

    def _count_on_train(self, sae: SAELike, source: Any, dead: DeadFraction) -> None:
        """Count firing on the source's training stream until `dead` has seen the window's tokens."""
        loader = getattr(source, "train_dataloader", None)
        if loader is None or self.window is None:
            return
        dev = sae.W_dec.device
        for batch in loader():
            x = batch_acts(batch).to(dev)
            dead.update(fired_counts(sae(x), sae.d_sae), x.shape[0])
            if int(dead.n) >= self.window:
                return
