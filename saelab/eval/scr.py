"""SAEBench's spurious-correlation removal (SCR) and targeted probe perturbation (TPP) scores.

Karvonen et al. 2025 (SAEBench, arXiv:2503.09532), after SHIFT (Marks et al. 2024, arXiv:2403.19647):

* latent effect on a linear probe with weight w (over host activations), for SAE latent i with decoder row
  d_i and mean activations μ⁺_i / μ⁻_i on the probe's positive / negative documents:
      effect_i = (μ⁺_i − μ⁻_i) · (w · d_i)
  (SCR ranks by |effect_i|; TPP by effect_i clamped at 0, the latents that push toward the class);
* SCR: a probe trained on the biased set (profession and gender coincide) is scored for profession on the
  balanced set (A_base); the top-N latents by effect on a gender probe are zero-ablated (A_abl); a probe
  trained on balanced data gives the skyline (A_oracle):
      SCR(N) = (A_abl − A_base) / (A_oracle − A_base)
  1 means ablation recovered the oracle, 0 nothing, < 0 harm;
* TPP: one-vs-rest probes per class; ablating class i's top-N latents should lower probe i's accuracy and no
  other probe's:
      TPP_i(N) = (A_clean_i − A_abl_{i,i}) − mean_{j≠i} (A_clean_j − A_abl_{i,j}),  TPP = mean_i TPP_i
  with A_abl_{i,j} the accuracy of probe j after ablating class i's latents.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from jaxtyping import Float
from torch import Tensor


def latent_effects(
    acts_pos: Float[Tensor, "n_pos d_sae"],
    acts_neg: Float[Tensor, "n_neg d_sae"],
    probe_w: Float[Tensor, " d_in"],
    W_dec: Float[Tensor, "d_sae d_in"],
) -> Float[Tensor, " d_sae"]:
    """effect_i = (μ⁺_i − μ⁻_i) · (w · d_i): each latent's contribution to the probe's class separation."""
    if acts_pos.shape[0] == 0 or acts_neg.shape[0] == 0:
        raise ValueError(
            f"latent effects need documents of both classes, got {acts_pos.shape[0]} positive and "
            f"{acts_neg.shape[0]} negative."
        )
    diff = acts_pos.detach().float().mean(0) - acts_neg.detach().float().mean(0)
    return diff * (W_dec.detach().float() @ probe_w.detach().float())


def top_latents(effects: Float[Tensor, " d_sae"], n: int, mode: str = "abs") -> list[int]:
    """The `n` latents of largest |effect| (`abs`, SCR) or largest positive effect (`positive`, TPP; latents
    with effect ≤ 0 are never chosen, so fewer than n may come back). Ties: the lower index first."""
    if mode not in ("abs", "positive"):
        raise ValueError(f"top_latents mode must be abs or positive, got {mode!r}.")
    score = effects.abs() if mode == "abs" else effects.clamp_min(0)
    n = min(int(n), score.numel())
    order = sorted(range(score.numel()), key=lambda i: (-float(score[i]), i))[:n]
    return [i for i in order if mode == "abs" or float(score[i]) > 0]


def scr_score(a_abl: float, a_base: float, a_oracle: float) -> float:
    """(A_abl − A_base) / (A_oracle − A_base); NaN where the oracle does no better than the base probe."""
    gap = a_oracle - a_base
    return (a_abl - a_base) / gap if abs(gap) > 1e-12 else math.nan


def tpp_score(
    clean: Mapping[str, float], ablated: Mapping[str, Mapping[str, float]]
) -> tuple[float, dict[str, float]]:
    """(TPP, {class: TPP_i}) from clean accuracies {j: A_clean_j} and {i: {j: A_abl_{i,j}}}."""
    classes = list(clean)
    if len(classes) < 2:
        raise ValueError(f"TPP needs two or more classes, got {classes}.")
    per = {}
    for i in classes:
        row = ablated[i]
        own = clean[i] - row[i]
        others = [clean[j] - row[j] for j in classes if j != i]
        per[i] = own - sum(others) / len(others)
    return sum(per.values()) / len(per), per


def scr_curve(
    accuracies: Mapping[int, float], a_base: float, a_oracle: float, ns: Sequence[int] = (2, 5, 10, 20, 50)
) -> dict[int, float]:
    """SCR(N) for each N in `ns` from {N: A_abl after ablating N latents}."""
    return {n: scr_score(accuracies[n], a_base, a_oracle) for n in ns if n in accuracies}


def accuracy(logits: Float[Tensor, " n"], labels: Tensor) -> float:
    """Binary accuracy of logits > 0 against 0/1 labels."""
    return float(((logits > 0).long() == labels.long()).float().mean()) if labels.numel() else math.nan
