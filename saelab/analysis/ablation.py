"""Latent ablation on a recommender's user representation: zero or boost one SAE latent and re-rank.

RecSAE (arXiv:2411.06112): manipulating a concept latent should change the recommendations in the
direction of its concept. For user vectors u with codes z = f(u) and a latent j (`saelab.edit.LatentEdit`,
zero or clamp):

    zero:  z'_j = 0              boost:  z'_j = max(z_j, value)
    u'   = u + (D(z') − D(z))    (keep_error: the SAE's reconstruction error stays in place)
    u'   = D(z')  vs  D(z)       (keep_error=False: both sides are reconstructions)

with D(z) = z W_dec + b_dec. Both u and u' are scored against every item; the effect is the change in
the share of the top-K recommended items that carry the concept, per user,
    Δ_u = share_K(u') − share_K(u),
tested with a two-sided paired t-test over users (scipy `ttest_rel`; the paper's `sig_test` is a
t-test at α = 0.05). When every Δ_u is 0 the test is undefined and p = 1 is reported.

`ablate_concept_latents` runs the paper's sweep over a concept dictionary's most confident latents:
zero each latent on the users where it is active, boost it on those where it is not, with the latent's
first concept as the item set, and summarises each mode by its mean Δ and its count of significant tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from scipy import stats
from torch import Tensor

from saelab.analysis import plots
from saelab.analysis.concepts import ConceptLatent, dense_codes
from saelab.edit import LatentEdit
from saelab.hosts.ranking import top_k_items


@torch.no_grad()
def ablate_latent(
    sae,
    reps: Float[Tensor, "n d_in"],
    latent: int,
    score_fn: Callable[[Tensor], Tensor],
    concept_items: Bool[Tensor, " n_items_1"],
    mode: str = "zero",
    value: float | None = None,
    k: int = 10,
    exclude: Bool[Tensor, "n n_items_1"] | None = None,
    keep_error: bool = True,
    alpha: float = 0.05,
) -> dict:
    """Effect of zeroing / boosting `latent` on the share of concept items in each top-k list.

    Returns n_users, share_before, share_after, delta (mean Δ_u), t, p_value, significant (p < alpha
    and Δ ≠ 0), frac_changed (users whose top-k list changed) and per-user `deltas`.
    """
    if mode not in ("zero", "boost"):
        raise ValueError(f"ablation mode must be 'zero' or 'boost', got {mode!r}.")
    if mode == "boost" and value is None:
        raise ValueError("boost ablation needs a value (e.g. the latent's typical activation).")
    # the boost's z'_j = max(z_j, value) is the edit's clamp
    edit = LatentEdit(sae, [latent], "zero" if mode == "zero" else "clamp", value)
    reps = reps.to(sae.W_dec.dtype)
    z = sae.encode(reps)  # (n, d_sae)
    base = reps if keep_error else sae.decode(z)
    # D(z') − D(z) only differs in latent j: (z'_j − z_j)·W_dec[j], exactly 0 where nothing changed
    moved = base + edit.delta_from_codes(z)
    before = top_k_items(score_fn(base), k, exclude)  # (n, k)
    after = top_k_items(score_fn(moved), k, exclude)
    concept_items = concept_items.to(before.device)
    share_b = concept_items[before].float().mean(1)
    share_a = concept_items[after].float().mean(1)
    deltas = share_a - share_b
    changed = (before.sort(1).values != after.sort(1).values).any(1)
    if len(deltas) >= 2 and bool((deltas != 0).any()):
        t, p = stats.ttest_rel(share_a.numpy(), share_b.numpy())
        t, p = float(t), float(p)
    else:
        t, p = 0.0, 1.0
    return {
        "latent": int(latent),
        "mode": mode,
        "n_users": int(len(deltas)),
        "share_before": float(share_b.mean()) if len(deltas) else float("nan"),
        "share_after": float(share_a.mean()) if len(deltas) else float("nan"),
        "delta": float(deltas.mean()) if len(deltas) else 0.0,
        "t": t,
        "p_value": p,
        "significant": bool(p < alpha and float(deltas.mean() if len(deltas) else 0) != 0),
        "frac_changed": float(changed.float().mean()) if len(deltas) else 0.0,
        "deltas": deltas,
    }


def concept_item_mask(
    item_attrs: Bool[Tensor, "n_items_1 n_attrs"], attrs: Int[Tensor, " m"] | list[int]
) -> Tensor:
    """Items that carry any of `attrs`."""
    idx = torch.as_tensor(attrs, dtype=torch.long)
    return item_attrs[:, idx].any(1)


def window_exclusion(windows: Int[Tensor, "n L"], n_items: int) -> Bool[Tensor, "n n_items_1"]:
    """Recommendation lists leave out padding (item 0) and the items already in the history window."""
    mask = torch.zeros(len(windows), n_items + 1, dtype=torch.bool)
    mask.scatter_(1, windows, True)
    mask[:, 0] = True
    return mask


@dataclass
class AblationSweep:
    """What `ablate_concept_latents` measured.

    `runs`: one dict per (latent, mode), the `ablate_latent` numbers without the per-user deltas, plus
    `concept` (the item set's attribute) and `confident`. `metrics`: per mode (`zero`, `boost`) that ran,
    `<mode>_mean_delta` (mean over latents of the mean Δ), `<mode>_n_significant` and `<mode>_n`.
    """

    runs: list[dict]
    metrics: dict[str, float]
    settings: dict = field(default_factory=dict)  # top_k, boost_scale, keep_error

    def table(self) -> tuple[list[str], list[list]]:
        """(headers, rows) of every run, for a report table."""
        headers = ["latent", "concept", "mode", "users", "share before", "share after", "Δ", "p",
                   "lists changed"]  # fmt: skip
        keys = ["latent", "concept", "mode", "n_users", "share_before", "share_after", "delta", "p_value",
                "frac_changed"]  # fmt: skip
        return headers, [[a[k] for k in keys] for a in self.runs]

    def note(self) -> str:
        """What the table shows and how it was measured, in one sentence."""
        s = self.settings
        return (
            f"Δ = change in the share of top-{s['top_k']} recommendations carrying the latent's first concept; "
            f"zero on histories where the latent is active, boost (to {s['boost_scale']}× its largest "
            "fit-split activation) where it is not; "
            + ("the change D(z') − D(z) is added to the original representation" if s["keep_error"]
               else "D(z') is compared with D(z)")
            + "; p from a paired t-test over histories."
        )  # fmt: skip

    def plot(self, path: str | Path) -> Path | None:
        """Bars of Δ per latent, zero and boost side by side (None when there is nothing to draw)."""
        zero = [a for a in self.runs if a["mode"] == "zero"]
        boost = [a for a in self.runs if a["mode"] == "boost"]
        labels = [f"{a['latent']} {a['concept']}" for a in (zero or boost)]
        series = {}
        if zero:
            series["zero (active users)"] = [a["delta"] for a in zero]
        if boost and len(boost) == len(labels):
            series["boost (inactive users)"] = [a["delta"] for a in boost]
        if not labels or not all(len(v) == len(labels) for v in series.values()):
            return None  # a latent active on every (or no) user has one mode only: the bars would not align
        return plots.bars(labels, series, Path(path), f"Δ share of concept items in top-{self.settings['top_k']}",
                          "Latent ablation", xlabel="latent and its concept")  # fmt: skip


@torch.no_grad()
def ablate_concept_latents(
    sae,
    rows: Mapping[str, Tensor],
    score_fn: Callable[[Tensor], Tensor],
    item_attrs: Bool[Tensor, "n_items_1 n_attrs"],
    latents: Sequence[ConceptLatent],
    *,
    n_latents: int,
    n_users: int,
    top_k: int,
    boost_scale: float,
    keep_error: bool,
    alpha: float,
    act_scale: float = 1.0,
) -> AblationSweep:
    """Zero / boost each of the first `n_latents` concept latents and measure the concept share of top-k lists.

    For latent j with first concept a (items I_a = those carrying a): on the first `n_users` rows, zero j
    where z_j > 0 and boost it to `boost_scale` · max_fit(j) where z_j = 0 (`ablate_latent`, with the
    history window excluded from the lists); a mode with no rows is skipped.

    Args:
        sae: the SAE.
        rows: {"acts": [n, d_in] host representations, "window": [n, L] left-padded history items}.
        score_fn: host representation [n, d_in] → item scores [n, n_items + 1] (e.g. `SASRec.score`).
        item_attrs: [n_items + 1, n_attrs] item attributes (row 0 = padding).
        latents: concept latents in the order to ablate (e.g. `concept_latents(...).latents`).
        n_latents, n_users: how many latents, and rows per latent.
        top_k, keep_error, alpha: `ablate_latent`'s k, keep_error, alpha.
        boost_scale: boost value as a multiple of the latent's largest fit-split activation.
        act_scale: the source's `act_scale` s: the SAE sees s·u and the host scores (s·u)'/s.
    """
    s = float(act_scale)
    reps = rows["acts"][:n_users]
    exclude = window_exclusion(rows["window"][:n_users], item_attrs.shape[0] - 1)
    codes = dense_codes(sae, reps, act_scale=s)
    in_host = score_fn if s == 1.0 else (lambda v: score_fn(v / s))
    runs = []
    for lat in latents[:n_latents]:
        items = concept_item_mask(item_attrs, [lat.attrs[0]])
        on = codes[:, lat.latent] > 0
        for mode, sel in (("zero", on), ("boost", ~on)):
            if int(sel.sum()) == 0:
                continue
            out = ablate_latent(sae, reps[sel] * s, lat.latent, in_host, items, mode=mode,
                                value=boost_scale * lat.max_fit, k=top_k, exclude=exclude[sel],
                                keep_error=keep_error, alpha=alpha)  # fmt: skip
            out.pop("deltas")
            runs.append({**out, "concept": next(iter(lat.concepts)), "confident": lat.confident})
    metrics = {}
    for mode in ("zero", "boost"):
        group = [a for a in runs if a["mode"] == mode]
        if group:
            metrics[f"{mode}_mean_delta"] = sum(a["delta"] for a in group) / len(group)
            metrics[f"{mode}_n_significant"] = sum(a["significant"] for a in group)
            metrics[f"{mode}_n"] = len(group)
    settings = {"top_k": top_k, "boost_scale": boost_scale, "keep_error": keep_error}
    return AblationSweep(runs, metrics, settings)
