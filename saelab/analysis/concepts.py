"""Concept dictionaries for SAE latents over item histories, and their interpretation confidence.

RecSAE (arXiv:2411.06112, v1) builds a dictionary of concepts per latent from the items of the
histories that activate it, then validates it by predicting the latent's activation on new histories
from the dictionary alone; precision and recall of that prediction are the confidence. Concretely:

1. Profile of a history h over item attributes a (genres, decade, title words), recency-weighted:
       p_h(a) = Σ_t w_t·1[a ∈ attrs(i_t)] / Σ_t w_t,   w_t = decay^(T−t)  (decay 1 = uniform, 0 = last item)
2. For latent j, the activation-weighted profile of its top-n activating histories on the fit split,
       P_j(a) = Σ_{h∈top_j} z_j(h)·p_h(a) / Σ_{h∈top_j} z_j(h),
   against the background B(a) = mean_h p_h(a):  lift_j(a) = P_j(a) / B(a).
3. D_j = the (≤ max_concepts) attributes with lift ≥ min_lift and P_j(a) ≥ min_support.
4. Concept score s_j(h) = Σ_{a∈D_j} log(lift_j(a))·p_h(a); predict "j active" iff s_j(h) ≥ τ_j, with
   τ_j > 0 (the history must hold concept items) chosen on the fit split to maximise F1.
5. On held-out histories: precision = P(active | predicted), recall = P(predicted | active),
   confidence = F1 = 2PR/(P+R). A latent is confident when F1 ≥ the bar and F1 beats the trivial
   "always active" predictor, whose F1 is 2ρ/(1+ρ) for a latent active on a share ρ of histories
   (without this, a latent that fires on most histories looks confident whatever its concepts).

`concept_latents` runs the whole assembly (codes, profiles, dictionary on the fit split, confidence on
fit and held-out splits, counts, per-latent records ordered confident-first) and returns `ConceptLatents`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from saelab.analysis import plots


def history_profiles(
    windows: Int[Tensor, "n L"],
    item_attrs: Bool[Tensor, "n_items_1 n_attrs"],
    decay: float = 1.0,
    chunk: int = 4096,
) -> Float[Tensor, "n n_attrs"]:
    """p_h(a): recency-weighted share of the items of each (left-padded) history that have attribute a."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}.")
    L = windows.shape[1]
    age = torch.arange(L - 1, -1, -1, dtype=torch.float32)  # 0 for the newest (rightmost) item
    w = torch.where(
        age == 0, torch.ones(()), torch.tensor(decay) ** age
    )  # 0^0 = 1: decay 0 keeps the last item
    attrs = item_attrs.float()
    out = []
    for i in range(0, len(windows), chunk):
        win = windows[i : i + chunk]
        wt = w[None] * (win > 0)  # (chunk, L)
        prof = torch.einsum("nl,nla->na", wt, attrs[win])
        out.append(prof / wt.sum(1, keepdim=True).clamp_min(1e-12))
    return torch.cat(out) if out else torch.zeros(0, item_attrs.shape[1])


@dataclass
class ConceptDictionary:
    """Per latent: its concept attributes, their lifts, the score weights and the decision threshold."""

    latents: Int[Tensor, " J"]  # latents with a non-empty concept set
    concepts: list[list[int]]  # attribute indices per latent, highest lift first
    lifts: list[list[float]]
    weights: Float[Tensor, "n_attrs J"]  # log-lift on the concept attributes, 0 elsewhere
    thresholds: Float[Tensor, " J"]
    top_rows: Int[Tensor, "n_top J"]  # fit-split rows of each latent's top activations
    attr_names: list[str]

    def names(self, j: int) -> list[str]:
        return [self.attr_names[a] for a in self.concepts[j]]

    def scores(self, profiles: Float[Tensor, "n n_attrs"]) -> Float[Tensor, "n J"]:
        return profiles @ self.weights

    def predict(self, profiles: Float[Tensor, "n n_attrs"]) -> Bool[Tensor, "n J"]:
        return self.scores(profiles) >= self.thresholds[None]


def best_f1_thresholds(
    scores: Float[Tensor, "n J"], active: Bool[Tensor, "n J"], min_score: float | None = None
) -> tuple[Float[Tensor, " J"], Float[Tensor, " J"]]:
    """For each column, the threshold τ maximising the F1 of (score ≥ τ) against `active`, and that F1.

    Cuts are only placed between distinct scores (ties fall on the same side); with `min_score`, only
    thresholds τ > min_score are allowed (τ = +inf, predicting nothing, when none is).
    """
    n = scores.shape[0]
    s, order = scores.sort(dim=0, descending=True)
    tp = active.gather(0, order).float().cumsum(0)  # (n, J): true positives when predicting the top i+1
    pos = active.float().sum(0)
    k = torch.arange(1, n + 1, dtype=torch.float32)[:, None]
    f1 = 2 * tp / (k + pos[None]).clamp_min(1)
    cut_ok = torch.ones_like(s, dtype=torch.bool)
    cut_ok[:-1] = s[:-1] > s[1:]
    if min_score is not None:
        cut_ok &= s > min_score
    f1 = f1.masked_fill(~cut_ok, -1.0)
    best, idx = f1.max(0)
    tau = s.gather(0, idx[None])[0].masked_fill(best < 0, float("inf"))
    return tau, best.clamp_min(0)


@torch.no_grad()
def build_dictionary(
    codes: Float[Tensor, "n d_sae"],
    profiles: Float[Tensor, "n n_attrs"],
    attr_names: list[str],
    n_top: int = 64,
    min_lift: float = 1.5,
    min_support: float = 0.1,
    max_concepts: int = 3,
    min_active: int = 10,
    chunk: int = 256,
) -> ConceptDictionary:
    """Steps 2–4 of the module docstring on the fit split: concepts by lift, thresholds by best F1."""
    n, d_sae = codes.shape
    if profiles.shape[0] != n:
        raise ValueError(f"codes have {n} rows but profiles have {profiles.shape[0]}.")
    n_top = min(n_top, n)
    background = profiles.mean(0).clamp_min(1e-9)  # (A,)
    n_active = (codes > 0).sum(0)
    latents, concepts, lifts, wcols, tops = [], [], [], [], []
    for c0 in range(0, d_sae, chunk):
        z = codes[:, c0 : c0 + chunk]
        top_v, top_i = z.topk(n_top, dim=0)  # (n_top, c)
        w = top_v.clamp_min(0)
        prof = torch.einsum("tc,tca->ca", w, profiles[top_i]) / w.sum(0)[:, None].clamp_min(1e-12)  # (c, A)
        lift = prof / background[None]
        ok = (lift >= min_lift) & (prof >= min_support)
        for jj in range(z.shape[1]):
            j = c0 + jj
            if int(n_active[j]) < min_active or not bool(ok[jj].any()):
                continue
            cand = ok[jj].nonzero(as_tuple=True)[0]
            cand = cand[lift[jj, cand].argsort(descending=True)][:max_concepts]
            col = torch.zeros(profiles.shape[1])
            col[cand] = lift[jj, cand].log()
            latents.append(j)
            concepts.append(cand.tolist())
            lifts.append(lift[jj, cand].tolist())
            wcols.append(col)
            tops.append(top_i[:, jj])
    J = len(latents)
    weights = torch.stack(wcols, 1) if J else torch.zeros(profiles.shape[1], 0)
    thresholds = torch.zeros(J)
    for c0 in range(0, J, chunk):
        sl = slice(c0, c0 + chunk)
        lat = torch.tensor(latents[sl], dtype=torch.long)
        # τ > 0: a history is predicted active only if it holds items with the concept attributes
        thresholds[sl] = best_f1_thresholds(profiles @ weights[:, sl], codes[:, lat] > 0, min_score=0.0)[0]
    top_rows = torch.stack(tops, 1) if J else torch.zeros(n_top, 0, dtype=torch.long)
    return ConceptDictionary(torch.tensor(latents, dtype=torch.long), concepts, lifts, weights, thresholds, top_rows,
                             list(attr_names))  # fmt: skip


@torch.no_grad()
def confidence(
    dictionary: ConceptDictionary, codes: Float[Tensor, "n d_sae"], profiles: Float[Tensor, "n n_attrs"]
) -> dict[str, Tensor]:
    """Precision, recall and F1 of predicting "latent active" from the dictionary on (held-out) rows."""
    if len(dictionary.latents) == 0:
        empty = torch.zeros(0)
        return {
            k: empty
            for k in ("precision", "recall", "f1", "n_active", "n_predicted", "base_rate", "baseline_f1")
        }
    pred = dictionary.predict(profiles).float()  # (n, J)
    act = (codes[:, dictionary.latents] > 0).float()
    tp = (pred * act).sum(0)
    n_pred, n_act = pred.sum(0), act.sum(0)
    precision = tp / n_pred.clamp_min(1)
    recall = tp / n_act.clamp_min(1)
    f1 = 2 * tp / (n_pred + n_act).clamp_min(1)
    rate = n_act / max(1, len(act))
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "n_active": n_act,
        "n_predicted": n_pred,
        "base_rate": rate,
        "baseline_f1": 2 * rate / (1 + rate),  # F1 of predicting "active" for every history
    }


@torch.no_grad()
def dense_codes(
    sae, acts: Float[Tensor, "n d_in"], batch_size: int = 4096, act_scale: float = 1.0
) -> Float[Tensor, "n d_sae"]:
    """z = f(s·x) for every row, in batches; s = the source's `act_scale` (the SAE's input units)."""
    chunks = [sae.encode(acts[i : i + batch_size] * act_scale) for i in range(0, len(acts), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, sae.d_sae)


@dataclass(frozen=True)
class ConceptLatent:
    """One latent with a concept set and its interpretation confidence (a row of results.json `latents`)."""

    latent: int
    f1: float  # held-out F1 of predicting "active" from the concepts
    precision: float
    recall: float
    f1_fit: float  # the same on the fit split
    baseline_f1: float  # held-out F1 of predicting "active" everywhere
    confident: bool  # f1 ≥ the bar and f1 > baseline_f1
    n_active_heldout: int
    concepts: dict[str, float]  # attribute name → lift, highest lift first
    examples: list[str]  # titles of the newest items of its top-activating fit histories
    attrs: list[int]  # attribute indices of `concepts`, same order
    max_fit: float  # its largest activation on the fit split (the scale of a boost)


@dataclass
class ConceptLatents:
    """What `concept_latents` found: the dictionary, ordered per-latent records and their counts.

    `metrics`: `n_alive_latents` (fire on ≥ 1 fit row), `n_with_concepts`, `n_confident` (F1 ≥ bar and
    above the "always active" baseline), `n_confident_pr` (precision and recall ≥ bar, above baseline),
    `n_above_baseline`, `mean_f1_heldout`, `mean_f1_fit`.
    """

    dictionary: ConceptDictionary
    latents: list[ConceptLatent]  # confident first, then by held-out F1
    metrics: dict[str, float]
    heldout: dict[str, Tensor]  # `confidence` on the held-out split, in dictionary order
    fit: dict[str, Tensor]  # `confidence` on the fit split
    settings: dict[str, Any] = field(default_factory=dict)  # decay, confidence_bar, n_fit, n_heldout

    def records(self) -> list[dict]:
        """The per-latent records as JSON-ready dicts."""
        return [asdict(r) for r in self.latents]

    def table(self, n: int) -> tuple[list[str], list[list]]:
        """(headers, rows) of the n most confident latents, for a report table."""
        headers = ["latent", "F1", "F1 of 'always active'", "precision", "recall", "active (held-out)",
                   "concepts (lift)", "example movies"]  # fmt: skip
        rows = [
            [r.latent, r.f1, r.baseline_f1, r.precision, r.recall, r.n_active_heldout,
             ", ".join(f"{a} ({lf:.1f}×)" for a, lf in r.concepts.items()), "; ".join(r.examples[:3])]
            for r in self.latents[:n]
        ]  # fmt: skip
        return headers, rows

    def note(self) -> str:
        """What the table shows and how it was measured, in one paragraph."""
        m, s = self.metrics, self.settings
        bar = s["confidence_bar"]
        return (
            f"{m['n_with_concepts']} of {m['n_alive_latents']} live latents have a concept set; "
            f"{m['n_confident']} reach held-out F1 ≥ {bar} and beat the 'always active' predictor (precision "
            f"and recall ≥ {bar}: {m['n_confident_pr']}). The dictionary is built on {s['n_fit']} histories "
            f"of half the users and scored on {s['n_heldout']} histories of the other half. Concepts are "
            f"attributes whose recency-weighted share (decay {s['decay']}) in the latent's top-activating "
            "histories exceeds their background share (lift); example movies are the newest items of those "
            "histories."
        )

    def plot(self, path: str | Path) -> Path | None:
        """Histogram of held-out F1 per concept latent (None when the dictionary is empty)."""
        if not len(self.heldout["f1"]):
            return None
        bar = self.settings["confidence_bar"]
        return plots.histogram(self.heldout["f1"], Path(path), "held-out F1 of the concept prediction",
                               "Interpretation confidence per concept latent",
                               vlines={f"confidence bar {bar:g}": bar})  # fmt: skip


@torch.no_grad()
def concept_latents(
    sae,
    fit: Mapping[str, Tensor],
    heldout: Mapping[str, Tensor],
    item_attrs: Bool[Tensor, "n_items_1 n_attrs"],
    attr_names: list[str],
    titles: list[str],
    *,
    decay: float,
    n_top: int,
    min_lift: float,
    min_support: float,
    max_concepts: int,
    min_active: int,
    confidence_bar: float,
    n_examples: int = 4,
    act_scale: float = 1.0,
) -> ConceptLatents:
    """The concept dictionary of an SAE over item histories, with its held-out confidence (steps 1–5 above).

    Args:
        sae: the SAE (`encode`, `d_sae`).
        fit, heldout: rows of two disjoint user sets, each {"acts": [n, d_in] host representations,
            "window": [n, L] left-padded item ids, "item": [n] the newest item}; the dictionary and its
            thresholds are fitted on `fit` and scored on both.
        item_attrs, attr_names, titles: item attributes (row 0 = padding), their names, item titles.
        decay: recency weight w_t = decay^(T−t) of the profiles (step 1).
        n_top, min_lift, min_support, max_concepts, min_active: `build_dictionary` (steps 2–4).
        confidence_bar: the F1 a latent needs (and the "always active" F1 it must beat) to be confident.
        n_examples: example titles kept per latent (from its 12 top-activating fit histories).
        act_scale: the source's `act_scale`; codes are f(act_scale · acts).

    Latents are ordered confident-first: those above the baseline by held-out F1, then the rest by F1.
    """
    z_fit = dense_codes(sae, fit["acts"], act_scale=act_scale)
    z_held = dense_codes(sae, heldout["acts"], act_scale=act_scale)
    p_fit = history_profiles(fit["window"], item_attrs, decay)
    p_held = history_profiles(heldout["window"], item_attrs, decay)
    dic = build_dictionary(z_fit, p_fit, attr_names, n_top=n_top, min_lift=min_lift, min_support=min_support,
                           max_concepts=max_concepts, min_active=min_active)  # fmt: skip
    conf_held, conf_fit = confidence(dic, z_held, p_held), confidence(dic, z_fit, p_fit)
    f1, bar = conf_held["f1"], float(confidence_bar)
    beats = f1 > conf_held["baseline_f1"]  # better than predicting "active" everywhere
    confident = (f1 >= bar) & beats
    metrics = {
        "n_alive_latents": int(((z_fit > 0).sum(0) > 0).sum()),
        "n_with_concepts": len(dic.latents),
        "n_confident": int(confident.sum()),
        "n_confident_pr": int(((conf_held["precision"] >= bar) & (conf_held["recall"] >= bar) & beats).sum()),
        "n_above_baseline": int(beats.sum()),
        "mean_f1_heldout": float(f1.mean()) if len(f1) else 0.0,
        "mean_f1_fit": float(conf_fit["f1"].mean()) if len(f1) else 0.0,
    }
    order = torch.where(beats, f1, f1 - 2).argsort(descending=True).tolist()  # F1 ≤ 1: confident first
    records = []
    for r in order:
        j = int(dic.latents[r])
        examples: list[str] = []
        for it in fit["item"][dic.top_rows[:, r][:12]].tolist():
            if titles[it] and titles[it] not in examples:
                examples.append(titles[it])
        records.append(
            ConceptLatent(
                latent=j,
                f1=float(f1[r]),
                precision=float(conf_held["precision"][r]),
                recall=float(conf_held["recall"][r]),
                f1_fit=float(conf_fit["f1"][r]),
                baseline_f1=float(conf_held["baseline_f1"][r]),
                confident=bool(confident[r]),
                n_active_heldout=int(conf_held["n_active"][r]),
                concepts={a: round(lf, 3) for a, lf in zip(dic.names(r), dic.lifts[r], strict=True)},
                examples=examples[:n_examples],
                attrs=list(dic.concepts[r]),
                max_fit=float(z_fit[:, j].max()),
            )
        )
    settings = {"decay": decay, "confidence_bar": bar, "n_fit": len(z_fit), "n_heldout": len(z_held)}
    return ConceptLatents(dic, records, metrics, conf_held, conf_fit, settings)
