"""Specialized SAEs (Muhamed, Diab, Smith 2025, arXiv:2411.00743): general SAE → retrieved subdomain → fine-tune.

Stages (parameters in `conf/recipe/ssae.yaml`; each training stage is one Lightning fit / W&B run):
  1. `general`:   an SAE trained on the general corpus (`cfg.data`, `cfg.objective`);
  2. selection:   subdomain documents retrieved from the general pool for the seed set `recipe.seed_corpus`,
                  by dense retrieval (all-MiniLM-L6-v2) and the BM25 baseline, each measured by its recall
                  of the domain documents hidden in the pool (`saelab.corpora.selection.select_methods`);
  3. fine-tunes:  one per entry of `recipe.finetune.objectives`, each starting from the general export:
                  `erm` (MSE) and `term` (TERM, R̃(t) = (1/t)·log mean exp(t·ℓ), the `tilted` term);
  4. evaluation:  every SAE on held-out domain text (`recipe.test_corpus`; `recipe.eval.domain`: L0, EV,
                  dead fraction, spliced perplexity / ce_loss_score / kl_score with the perplexity-vs-L0
                  points at other inference-time k, tail-token coverage) and on general text
                  (`recipe.eval.general`).

Writes results.json, report.md, `ppl_vs_l0.png` and `coverage.png`, and prints the comparison and
coverage tables.
"""

from __future__ import annotations

import math

from hydra.utils import instantiate
from omegaconf import DictConfig

from saelab.analysis.coverage import coverage_plot, coverage_rows
from saelab.corpora.selection import select_methods
from saelab.eval.base import EvalResult, Table
from saelab.eval.spliced import ppl_vs_l0, ppl_vs_l0_plot
from saelab.report import Report, summary_table
from saelab.stage import evaluate_stage, finetune_cfg, finish, text_data, train_stage
from saelab.train import plain, run_dir_of


def run(cfg: DictConfig) -> dict:
    run_dir, rc = run_dir_of(cfg), cfg.recipe
    corpus, val_corpus, test = map(instantiate, (cfg.data.corpus, cfg.data.val_corpus, rc.test_corpus))

    # 1. the general SAE on the general corpus, exported where every fine-tune starts from
    export, general = run_dir / "general" / "sae", text_data(cfg, corpus, val_corpus)
    stages = {"general": train_stage(cfg, run_dir, "general", datamodule=general, export_dir=export)}

    # 2. the subdomain: retrieved from the general pool for the seed set; the first method is the one used
    hidden = instantiate(rc.hidden_corpus).ids if rc.hidden_corpus else ()  # for the recall of each method
    seed = instantiate(rc.seed_corpus)
    chosen, selection = select_methods(
        seed, corpus, relevant_ids=hidden, out_dir=run_dir / "select", **plain(rc.selection)
    )
    methods = list(rc.selection.methods)

    # 3. fine-tunes of the general SAE on the subdomain, one per objective
    ft = rc.finetune
    for name, terms in ft.objectives.items():
        dm = text_data(cfg, chosen[methods[0]], test, train_tokens=ft.train_tokens, val_tokens=ft.val_tokens)
        ft_cfg = finetune_cfg(cfg, export, terms, ft.max_steps, ft.lr)
        stages[name] = train_stage(ft_cfg, run_dir, name, datamodule=dm)
    if not stages["general"].is_global_zero:  # under DDP only rank 0 evaluates and reports
        return {}

    # 4. every SAE on held-out domain text and on general text
    saes = {n: st.sae for n, st in stages.items()}
    sources = {
        "domain": text_data(cfg, corpus, test, val_tokens=rc.eval.domain_tokens),
        "general": text_data(cfg, corpus, val_corpus, val_tokens=rc.eval.general_tokens),
    }
    ev = {
        d: evaluate_stage(cfg, run_dir, f"eval_{d}", saes, {d: src}, rc.eval[d])[d]
        for d, src in sources.items()
    }

    # report
    report = Report(run_dir, f"Specialized SAEs: {cfg.name}", cfg.name)
    for d, per in ev.items():
        for n, r in per.items():
            report.add_eval(r, f"{n}/{d}/", tables=False, figures=False)
    report.add_table("Comparison", _comparison(ev), terminal=True)
    cov_heading = "Tail-token coverage (domain test, bins = token count in the general training data)"
    headers, rows = coverage_rows({n: r.data["coverage"] for n, r in ev["domain"].items()})
    report.add_table(cov_heading, Table(headers, rows), terminal=True)
    cov_title = "Tail-token coverage by corpus-frequency bin (domain test)"
    cov_fig = coverage_plot(headers, rows, run_dir / "coverage.png", cov_title)
    report.add_figure("coverage by frequency bin", cov_fig, heading=cov_heading)
    curves = ppl_vs_l0(ev["domain"])
    clean_ppl = next(iter(ev["domain"].values())).metrics.get("clean_ppl")  # the same for every SAE
    ppl_fig = ppl_vs_l0_plot(curves, run_dir / "ppl_vs_l0.png", clean_ppl)
    report.add_figure("perplexity vs L0", ppl_fig, heading="Perplexity vs L0")
    report.add_text(
        "Data selection", f"Seed docs: {selection['seed_docs']}, pool docs: {selection['pool_docs']}."
    )
    report.add_table("Data selection", _selection_table({m: selection[m] for m in methods}))
    report.add_text("Artifacts", "\n".join(f"- `{n}`: `{st.export}`" for n, st in stages.items()))
    report.add_metrics(
        {f"selection/{m}/{k}": v for m in methods for k, v in selection[m].items() if not isinstance(v, dict)}
    )
    report.add_data("selection", selection).add_data("ppl_vs_l0", curves)
    report.add_data(
        "stages",
        {n: {"seconds": st.seconds, "steps": st.steps, "export": st.export} for n, st in stages.items()},
    )
    return finish(cfg, report)


# header: (source, metric) of the comparison table
COLUMNS = {
    "domain ppl": ("domain", "spliced_ppl"),
    "domain ce_loss_score": ("domain", "ce_loss_score"),
    "domain kl_score": ("domain", "kl_score"),
    "L0": ("domain", "l0"),
    "EV (domain)": ("domain", "explained_variance"),
    "EV (general)": ("general", "explained_variance"),
    "general ppl": ("general", "spliced_ppl"),
    "general ce_loss_score": ("general", "ce_loss_score"),
    "dead frac": ("domain", "dead_frac"),
    "coverage (domain)": ("domain", "coverage"),
}


def _comparison(ev: dict[str, dict[str, EvalResult]]) -> Table:
    """One row per SAE, then the clean model (perplexity of the unmodified host; scores 1 by definition)."""
    names = list(ev["domain"])
    rows: dict[str, dict[str, float | None]] = {
        n: {h: ev[d][n].metrics.get(m, math.nan) for h, (d, m) in COLUMNS.items()} for n in names
    }
    clean = {d: ev[d][names[0]].metrics.get("clean_ppl") for d in ev}
    if clean["domain"] is not None:
        rows["(clean model)"] = {
            "domain ppl": clean["domain"],
            "domain ce_loss_score": 1.0,
            "domain kl_score": 1.0,
            "general ppl": clean["general"],
            "general ce_loss_score": 1.0,
        }
    return summary_table(rows, list(COLUMNS), "SAE")


def _selection_table(stats: dict[str, dict]) -> Table:
    headers = ["method", "docs", "words", "precision (hidden domain docs)", "recall", "sources"]
    mix = {m: ", ".join(f"{k}:{c}" for k, c in v["sources"].items()) for m, v in stats.items()}
    keys = ("n_docs", "n_words", "precision_hidden", "recall_hidden")
    return Table(headers, [[m, *[v[k] for k in keys], mix[m]] for m, v in stats.items()])
