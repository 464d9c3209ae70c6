"""Evaluate an SAE on held-out activations: L0, FVU / explained variance, dead fraction, geometry."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Float
from torch import Tensor

from saelab.eval.metrics import FVU, L0, DeadFraction, FeatureRecovery, MeanMaxCosine


def _acts(batch) -> Tensor:
    if isinstance(batch, dict):
        return batch["acts"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


@torch.no_grad()
def evaluate_sae(
    sae,
    batches: Iterable,
    n_batches: int | None = None,
    true_features: Float[Tensor, "n d_in"] | None = None,
    recovery_threshold: float = 0.9,
) -> dict:
    """Stream `batches` through `sae` (in eval mode) and return a flat dict of metrics.

    Keys: `l0`, `fvu`, `explained_variance` (whole-set SAELens definition, see `metrics.FVU`),
    `dead_frac`, `mean_max_cos`, `n_tokens`; with `true_features` also `feature_recovery` (mean max
    cosine of true features to decoder rows) and `frac_recovered` (share above `recovery_threshold`).
    `density` (per-latent firing frequency) is returned as a tensor for plots.
    """
    was_training = sae.training
    sae.eval()
    local = {"sync_on_compute": False}  # evaluation runs in one process, also after a DDP fit
    l0, fvu, dead = L0(**local), FVU(sae.d_in, **local), DeadFraction(sae.d_sae, **local)
    for i, batch in enumerate(batches):
        if n_batches is not None and i >= n_batches:
            break
        x = _acts(batch).to(sae.W_dec.device)
        out = sae(x)
        l0.update(out.l0)
        fvu.update(out.y, out.x_hat)
        if out.sparse is not None:
            nz = out.sparse.vals != 0
            fired = torch.bincount(out.sparse.cols[nz], minlength=sae.d_sae)
        else:
            fired = (out.codes != 0).sum(0)
        dead.update(fired, x.shape[0])
    mmc = MeanMaxCosine(**local)
    mmc.update(sae.W_dec)
    f = float(fvu.compute())
    res = {
        "l0": float(l0.compute()),
        "fvu": f,
        "explained_variance": 1 - f,
        "dead_frac": float(dead.compute()),
        "mean_max_cos": float(mmc.compute()),
        "n_tokens": int(dead.n),
        "density": dead.density().float(),
    }
    if true_features is not None:
        rec = FeatureRecovery(true_features, **local)
        rec.update(sae.W_dec)
        res["feature_recovery"] = float(rec.compute())
        res["frac_recovered"] = rec.recovered(recovery_threshold)
        res["recovery_scores"] = rec.scores.float()
    sae.train(was_training)
    return res
