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

import torch
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


class _BiosEvaluator:
    """What SCR and TPP share: text sources only, and a host part computed once per host (`_part`)."""

    name = ""
    _memo: dict[int, dict]

    def applies_to(self, source) -> str | None:
        host = getattr(source, "host", None)
        if host is None or getattr(host, "tokenizer", None) is None:
            return "needs a text source with a tokenizer host (data=text)"
        return None

    def host_part(self, host) -> dict:
        if id(host) not in self._memo:
            self._memo[id(host)] = self._build(host)
        return self._memo[id(host)]

    def _build(self, host) -> dict:
        raise NotImplementedError

    @staticmethod
    def _scale(source) -> float:
        return float(getattr(source, "act_scale", 1.0) or 1.0)


class SCR(_BiosEvaluator):
    """SCR(N) of an SAE on labelled biographies, as an evaluator (`eval/metrics=[..., scr]`) on text sources.

    The host part (SHIFT's splits of `saelab.corpora.bios`, the documents' pooled activations, the profession
    probe trained on the ambiguous set, the gender probe trained on the other professions' biographies, and the
    oracle accuracy from a probe cross-fitted on the balanced set) is computed once per host and reused for
    every SAE. Per SAE: the N latents of largest |effect| on the gender probe are zero-ablated through the
    splice and the profession probe re-scored on the balanced set; metrics `scr_<N>` and `scr_base_acc`,
    `scr_oracle_acc`. Formulas in the module docstring and `saelab.analysis.shift`.
    """

    name = "scr"

    def __init__(
        self,
        source: str = "offline",
        professions: Sequence[str] = ("musician", "actor"),
        genders: Sequence[str] = ("male", "female"),
        ns: Sequence[int] = (2, 5, 10, 20, 50),
        others_max_docs: int = 600,
        min_group: int = 8,
        seed: int = 0,
    ) -> None:
        self.source, self.professions, self.genders = source, tuple(professions), tuple(genders)
        self.ns, self.others_max_docs = sorted({int(n) for n in ns}), int(others_max_docs)
        self.min_group, self.seed = int(min_group), int(seed)
        self._memo: dict[int, dict] = {}

    def _build(self, host) -> dict:
        from saelab.analysis.shift import document_activations, pool, train_probe
        from saelab.corpora.bios import load_bios, other_professions, shift_splits

        bios = load_bios(self.source)
        splits = shift_splits(
            bios, self.professions, self.genders, min_group=self.min_group, split_seed=self.seed
        )
        others = other_professions(bios, self.professions, self.others_max_docs)
        sets = {"ambiguous": splits.ambiguous, "balanced": splits.balanced, "others": others}
        docs = {n: document_activations(host, c.texts, desc=f"scr: {n} documents") for n, c in sets.items()}
        acts = {n: pool(d).acts for n, d in docs.items()}
        y = {n: _is(c.label("profession"), self.professions[1]) for n, c in sets.items()}
        g = {n: _is(c.label("gender"), self.genders[1]) for n, c in sets.items()}
        probe = train_probe(acts["ambiguous"], y["ambiguous"], seed=self.seed)
        gender_probe = train_probe(acts["others"], g["others"], seed=self.seed)
        half = torch.arange(len(y["balanced"])) % 2 == 0
        oracle = [
            train_probe(acts["balanced"][half == h], y["balanced"][half == h], seed=self.seed).accuracy(
                acts["balanced"][half != h], y["balanced"][half != h]
            )
            for h in (True, False)
        ]
        return {
            "docs": docs, "acts": acts, "y": y, "g": g, "probe": probe, "gender_probe": gender_probe,
            "base": probe.accuracy(acts["balanced"], y["balanced"]), "oracle": sum(oracle) / 2,
        }  # fmt: skip

    @torch.no_grad()
    def __call__(self, sae, source, out_dir):
        from saelab.analysis.shift import ablate, pool
        from saelab.eval.base import EvalResult

        part = self.host_part(source.host)
        codes = {n: pool(part["docs"][n], sae, self._scale(source)).codes for n in ("balanced", "others")}
        g = part["g"]["others"]
        assert codes["others"] is not None and codes["balanced"] is not None
        effects = latent_effects(
            codes["others"][g == 1], codes["others"][g == 0], part["gender_probe"].w, sae.W_dec
        )
        order = top_latents(effects, max(self.ns))
        metrics = {"scr_base_acc": part["base"], "scr_oracle_acc": part["oracle"]}
        for n in self.ns:
            x = ablate(part["acts"]["balanced"], codes["balanced"], sae, order[:n])
            acc = part["probe"].accuracy(x, part["y"]["balanced"])
            metrics[f"scr_{n}"] = scr_score(acc, part["base"], part["oracle"])
        return EvalResult(metrics=metrics, data={"scr_latents": order})


def _is(values: Sequence[str], positive: str) -> Tensor:
    return torch.tensor([v == positive for v in values], dtype=torch.long)


class TPP(_BiosEvaluator):
    """TPP(N) of an SAE on labelled biographies, as an evaluator (`eval/metrics=[..., tpp]`) on text sources.

    Host part, once per host: up to `max_docs_per_class` documents of each profession in the data, split by
    person into probe-training and test halves; one one-vs-rest probe per profession on the training half's
    pooled activations. Per SAE and N: for each profession i, the N latents with the largest positive effect on
    probe i (computed on the training half) are zero-ablated through the splice in the test half, and every
    probe is re-scored there; `tpp_<N>` is the mean over professions of TPP_i (module docstring).
    """

    name = "tpp"

    def __init__(
        self,
        source: str = "offline",
        ns: Sequence[int] = (2, 5, 10, 20),
        max_docs_per_class: int = 120,
        seed: int = 0,
    ) -> None:
        self.source, self.ns = source, sorted({int(n) for n in ns})
        self.max_docs_per_class, self.seed = int(max_docs_per_class), int(seed)
        self._memo: dict[int, dict] = {}

    def _build(self, host) -> dict:
        from saelab.analysis.shift import document_activations, pool, train_probe
        from saelab.corpora.bios import load_bios
        from saelab.corpora.text import _unit, split_of

        bios = load_bios(self.source)
        prof = bios.label("profession")
        classes = sorted(set(prof))
        if len(classes) < 2:
            raise ValueError(f"TPP needs two or more professions in {bios.name!r}, found {classes}.")
        keep = []
        for c in classes:
            idx = sorted((i for i, p in enumerate(prof) if p == c), key=lambda i: _unit("tpp", bios.ids[i]))
            keep += idx[: self.max_docs_per_class]
        sub = bios.subset(sorted(keep), name="tpp")
        who = sub.labels.get("person", sub.ids)
        test = torch.tensor([split_of(w, 0.5, self.seed) == "test" for w in who])
        docs = document_activations(host, sub.texts, desc="tpp: documents")
        acts = pool(docs).acts
        labels = sub.label("profession")
        y = {c: _is(labels, c) for c in classes}
        probes = {c: train_probe(acts[~test], y[c][~test], seed=self.seed) for c in classes}
        clean = {c: probes[c].accuracy(acts[test], y[c][test]) for c in classes}
        return {"docs": docs, "acts": acts, "test": test, "y": y, "probes": probes, "clean": clean}

    @torch.no_grad()
    def __call__(self, sae, source, out_dir):
        from saelab.analysis.shift import ablate, pool
        from saelab.eval.base import EvalResult

        part = self.host_part(source.host)
        codes = pool(part["docs"], sae, self._scale(source)).codes
        assert codes is not None
        test, acts, y, probes = part["test"], part["acts"], part["y"], part["probes"]
        order = {}
        for c in probes:
            pos, neg = codes[~test & (y[c] == 1)], codes[~test & (y[c] == 0)]
            order[c] = top_latents(latent_effects(pos, neg, probes[c].w, sae.W_dec), max(self.ns), "positive")
        metrics, per_class = {}, {}
        for n in self.ns:
            ablated = {}
            for i in probes:
                x = ablate(acts[test], codes[test], sae, order[i][:n])
                ablated[i] = {j: probes[j].accuracy(x, y[j][test]) for j in probes}
            metrics[f"tpp_{n}"], per_class[n] = tpp_score(part["clean"], ablated)
        return EvalResult(metrics=metrics, data={"tpp_per_class": per_class, "tpp_latents": order})
