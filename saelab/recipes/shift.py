"""SHIFT on Bias in Bios (Marks et al. 2024, arXiv:2403.19647; the SSAE case study, O'Neill et al. 2024,
arXiv:2411.00743 §5) with SAEBench's SCR (Karvonen et al. 2025, arXiv:2503.09532).

Stages (parameters in `conf/recipe/shift.yaml`):
  1. data:   labelled biographies (`saelab.corpora.bios`: offline stand-in or LabHC/bias_in_bios), SHIFT's
             ambiguous training set and balanced test set for `professions` × `genders`, and the biographies
             of every other profession (gender-probe training; never tested on);
  2. `gsae`: a BatchTopK SAE on general text (`cfg.data`); `ssae`: the GSAE fine-tuned on biography text: the
             documents dense retrieval (the ssae recipe's, `ssae.selection`) finds in the general pool from the
             ambiguous training bios as seeds, plus the training bios and the other professions' biographies
             (the balanced test set never);
  3. probes on mean-pooled hook activations (`saelab.analysis.shift`): the profession probe on the ambiguous
             set (early stopping on a held-out fifth), the gender probe on the other professions' biographies,
             the oracle (profession probe trained on balanced data, two-fold cross-fitted on the test set);
  4. SHIFT per SAE: the `n_latents` latents of largest |effect| on the gender probe are zero-ablated through the
             splice; the profession probe is re-scored (SHIFT) and retrained on the ablated ambiguous set
             (SHIFT+retrain); SCR(N) = (A_abl − A_base)/(A_oracle − A_base) for N in `scr_n`;
  5. the neuron skyline: the same selection over host dimensions (effect (μ⁺_k − μ⁻_k)·w_k), zeroed.
Columns: profession accuracy on the balanced set, gender accuracy (how well the profession probe's predictions
match gender; chance 0.5), worst-group accuracy, and the four groups.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from saelab.analysis import plots
from saelab.analysis.shift import (
    Pooled,
    Probe,
    ablate,
    ablate_neurons,
    document_activations,
    document_tokens,
    group_accuracy,
    latent_top_tokens,
    pool,
    train_probe,
)
from saelab.corpora.bios import load_bios, other_professions, shift_splits
from saelab.corpora.selection import select_methods
from saelab.corpora.text import concat, split_of
from saelab.eval.scr import latent_effects, scr_score, top_latents
from saelab.io import load_sae
from saelab.report import Report, summary_table
from saelab.stage import finetune_cfg, finish, text_data, train_stage
from saelab.train import plain, run_dir_of

COLUMNS = ["profession_acc", "gender_acc", "worst_group"]


def _labels(corpus, professions, genders) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.tensor([p == professions[1] for p in corpus.label("profession")], dtype=torch.long)
    g = torch.tensor([s == genders[1] for s in corpus.label("gender")], dtype=torch.long)
    return y, g


def _row(probe: Probe, x: torch.Tensor, corpus, professions, genders) -> dict[str, float]:
    return _scores(probe.logits(x), corpus, professions, genders)


def _scores(logits: torch.Tensor, corpus, professions, genders) -> dict[str, float]:
    _, g = _labels(corpus, professions, genders)
    groups = group_accuracy(logits, corpus.label("profession"), corpus.label("gender"), professions[1])
    pred = (logits > 0).long()
    return {
        "profession_acc": groups.pop("accuracy"),
        "gender_acc": float((pred == g).float().mean()),
        **groups,
    }


def _oracle(x: torch.Tensor, corpus, professions, genders, seed: int) -> dict[str, float]:
    """A profession probe trained on balanced data: two folds of the test set, each scored on the other."""
    y, _ = _labels(corpus, professions, genders)
    fold = torch.tensor([split_of(i, 0.5, seed) == "test" for i in corpus.labels.get("person", corpus.ids)])
    logits = torch.empty(len(y))
    for f in (True, False):
        logits[fold == f] = train_probe(x[fold != f], y[fold != f], seed=seed).logits(x[fold == f])
    return _scores(logits, corpus, professions, genders)


def run(cfg: DictConfig) -> dict:
    run_dir, rc = run_dir_of(cfg), cfg.recipe
    profs, gens = tuple(rc.professions), tuple(rc.genders)
    bios = load_bios(rc.source, **plain(rc.source_args) if rc.get("source_args") else {})
    splits = shift_splits(bios, profs, gens, min_group=int(rc.min_group), split_seed=int(cfg.seed))
    print(f"SHIFT splits of {bios.name} ({len(bios)} documents):\n{splits.summary()}", flush=True)
    others = other_professions(bios, profs, rc.others_max_docs)
    if len(set(others.label("gender"))) < 2:
        raise ValueError("the gender probe needs biographies of both genders outside the two professions.")

    # 2. the general SAE and its specialised fine-tune on biography text
    corpus, val_corpus = instantiate(cfg.data.corpus), instantiate(cfg.data.val_corpus)
    general = text_data(cfg, corpus, val_corpus)
    host = general.host
    gsae = train_stage(cfg, run_dir, "gsae", datamodule=general)
    assert gsae.export is not None, "the gsae stage exports its SAE"
    s_cfg = rc.ssae
    o_val = others.subset(
        [i for i, d in enumerate(others.ids) if split_of(d, 0.2, 0) == "test"], name="bios_val"
    )
    # the SSAE's text: biographies retrieved from the general pool by dense retrieval seeded with the ambiguous
    # training bios (the ssae recipe's selection), plus the training biographies themselves
    sel = plain(s_cfg.selection)
    retrieved, selection = select_methods(splits.ambiguous, corpus, out_dir=run_dir / "select", **sel)
    o_train = others.subset([i for i, d in enumerate(others.ids) if d not in set(o_val.ids)])
    bio_train = concat([retrieved[sel["methods"][0]], splits.ambiguous, o_train], name="bios+retrieved")
    ft = finetune_cfg(cfg, gsae.export, cfg.objective.terms, int(s_cfg.max_steps), float(s_cfg.lr))
    sizes = {"train_tokens": int(s_cfg.train_tokens), "val_tokens": int(s_cfg.val_tokens)}
    bio = text_data(cfg, bio_train, o_val, host=host, **sizes)
    ssae = train_stage(ft, run_dir, "ssae", datamodule=bio)
    if not gsae.is_global_zero:
        return {}
    saes = {"GSAE": load_sae(gsae.export), "SSAE": load_sae(ssae.export)}
    saes |= {str(n): load_sae(Path(p)) for n, p in (rc.get("extra_saes") or {}).items()}
    scale = float(getattr(general, "act_scale", 1.0) or 1.0)

    # 3. pooled activations and codes; the probes
    docs = {
        n: document_activations(host, c.texts, desc=f"shift: {n} documents")
        for n, c in (("ambiguous", splits.ambiguous), ("balanced", splits.balanced), ("others", others))
    }
    y_amb, _ = _labels(splits.ambiguous, profs, gens)
    _, g_oth = _labels(others, profs, gens)
    acts = {n: pool(d).acts for n, d in docs.items()}
    toks = document_tokens(host, others.texts)
    assert all(len(t) == len(d) for t, d in zip(toks, docs["others"], strict=True))

    def decode(i: int) -> str:
        return repr(host.tokenizer.decode([i]))

    probe = train_probe(acts["ambiguous"], y_amb, seed=int(cfg.seed))
    gender_probe = train_probe(acts["others"], g_oth, seed=int(cfg.seed))
    rows = {"Original": _row(probe, acts["balanced"], splits.balanced, profs, gens)}
    base_acc = rows["Original"]["profession_acc"]
    oracle = _oracle(acts["balanced"], splits.balanced, profs, gens, int(cfg.seed))
    n_lat, ns = int(rc.n_latents), sorted({int(n) for n in rc.scr_n})
    scr: dict[str, dict[int, float]] = {}
    chosen: dict[str, list[dict]] = {}

    # 4. SHIFT per SAE
    for name, sae in saes.items():
        pooled: dict[str, Pooled] = {n: pool(d, sae, scale) for n, d in docs.items()}
        codes = {n: p.codes for n, p in pooled.items() if p.codes is not None}
        effects = latent_effects(
            codes["others"][g_oth == 1], codes["others"][g_oth == 0], gender_probe.w, sae.W_dec
        )
        order = top_latents(effects, max([n_lat, *ns]))
        given = (rc.get("latents") or {}).get(name)
        if given is not None:  # a hand-written list replaces the automatic choice (SCR(N) keeps the ranking)
            bad = [j for j in given if not 0 <= int(j) < sae.d_sae]
            if bad:
                raise ValueError(f"recipe.latents.{name}: latents {bad} are outside 0..{sae.d_sae - 1}.")
            order = [int(j) for j in given] + [j for j in order if j not in set(given)]
            n_lat_sae = len(given)
        else:
            n_lat_sae = n_lat
        words = latent_top_tokens(sae, docs["others"], toks, order[:n_lat_sae], decode, scale)
        chosen[name] = [
            {"latent": j, "effect": float(effects[j]), "top_tokens": words.get(j, [])}
            for j in order[:n_lat_sae]
        ]

        def ablated(n: str, k: int, c=codes, sae=sae, order=order) -> torch.Tensor:
            return ablate(acts[n], c[n], sae, order[:k])

        bal, amb = ablated("balanced", n_lat_sae), ablated("ambiguous", n_lat_sae)
        rows[f"{name} SHIFT"] = _row(probe, bal, splits.balanced, profs, gens)
        retrained = train_probe(amb, y_amb, seed=int(cfg.seed))
        rows[f"{name} SHIFT+retrain"] = _row(retrained, bal, splits.balanced, profs, gens)
        scr[name] = {
            k: scr_score(
                _row(probe, ablated("balanced", k), splits.balanced, profs, gens)["profession_acc"],
                base_acc,
                oracle["profession_acc"],
            )
            for k in ns
        }

    # 5. the neuron skyline and the oracle
    mu = acts["others"][g_oth == 1].mean(0) - acts["others"][g_oth == 0].mean(0)
    neurons = top_latents(mu * gender_probe.w, n_lat)
    rows["Neurons SHIFT"] = _row(
        probe, ablate_neurons(acts["balanced"], neurons), splits.balanced, profs, gens
    )
    retrained = train_probe(ablate_neurons(acts["ambiguous"], neurons), y_amb, seed=int(cfg.seed))
    rows["Neurons SHIFT+retrain"] = _row(
        retrained, ablate_neurons(acts["balanced"], neurons), splits.balanced, profs, gens
    )
    rows["Oracle"] = oracle

    # report
    groups = [f"{p}/{g}" for p in profs for g in gens]
    report = Report(run_dir, f"SHIFT on Bias in Bios: {cfg.name}", cfg.name)
    n_test = splits.counts["balanced"][groups[0]]
    note = (
        f"Balanced test set: {n_test} documents per group ({4 * n_test} in all); one document in the smallest group "
        f"moves worst-group accuracy by {1 / n_test:.3f}, and its binomial standard error near 0.8 is "
        f"{math.sqrt(0.8 * 0.2 / n_test):.3f}. {n_lat} latents (neurons) ablated."
    )
    report.add_table("SHIFT", summary_table(rows, [*COLUMNS, *groups], "row"), note=note, terminal=True)
    report.add_table(
        "SCR(N)",
        summary_table(
            {n: {str(k): v for k, v in c.items()} for n, c in scr.items()}, [str(k) for k in ns], "SAE"
        ),
        terminal=True,
    )
    fig = plots.bars(
        groups,
        {n: [r[g] for g in groups] for n, r in rows.items()},
        run_dir / "groups.png",
        "accuracy",
        "Profession accuracy per group",
        xlabel="profession/gender group (balanced test set)",
    )
    report.add_figure("accuracy per (profession, gender) group", fig)
    fig = plots.scatter(
        {n: (list(c), list(c.values())) for n, c in scr.items()},
        run_dir / "scr.png",
        "latents ablated (N)",
        "SCR (0 = base probe, 1 = oracle)",
        "SCR vs N",
    )
    report.add_figure("SCR vs number of ablated latents", fig)
    report.add_text(
        "Selected latents",
        "Latent (effect on the gender probe): its top-activating tokens on the other professions' biographies.\n\n"
        + "\n".join(
            f"- {n} {c['latent']} ({c['effect']:+.3g}): {' '.join(c['top_tokens'])}"
            for n, cs in chosen.items()
            for c in cs
        ),
    )
    report.add_text("Definitions", __doc__ or "")
    report.add_metrics({f"{r}/{k}": v for r, m in rows.items() for k, v in m.items()})
    report.add_metrics({f"{n}/scr_{k}": v for n, c in scr.items() for k, v in c.items()})
    report.add_data("splits", splits.counts).add_data("rows", rows).add_data("scr", scr).add_data(
        "selected", chosen
    )
    report.add_data("selection", selection)
    report.add_data("probe_epochs", {"profession": probe.epochs, "gender": gender_probe.epochs})
    return finish(cfg, report)
