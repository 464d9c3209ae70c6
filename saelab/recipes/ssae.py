"""Specialized SAEs (Muhamed, Diab, Smith 2025, arXiv:2411.00743): general SAE → retrieved subdomain → fine-tune.

Stages (each its own Lightning fit / W&B run in the group `cfg.name`):
  1. `general`: an SAE trained on the general corpus (`cfg.data`), exported to <run>/general/sae;
  2. `select`:  dense retrieval (all-MiniLM-L6-v2) of subdomain documents from the general pool, starting
                from the seed set `ssae.seed_corpus`; BM25 runs as the baseline and both selections'
                statistics are reported (recall of the physics documents hidden in the pool, source mix);
  3. `erm`:     the general SAE fine-tuned on the dense selection with the objective as configured (mse);
  4. `term`:    the same fine-tune with the MSE term replaced by TERM (`tilted`, R̃(t) = (1/t)·log mean exp(t·ℓ));
  5. `eval`:    all three SAEs on held-out domain text (`ssae.test_corpus`) and general text: spliced
                perplexity exp(CE_sae), ce_loss_score, kl_score, L0, explained variance, dead fraction, and
                tail-token coverage per corpus-frequency bin (`saelab.analysis.coverage`).

Writes results.json, report.md, `ppl_vs_l0.png` (perplexity vs L0, each SAE evaluated at several
inference-time k for TopK-family SAEs) and `coverage.png` (coverage by frequency bin), and prints the table.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from saelab.analysis import plots
from saelab.analysis.coverage import sae_coverage, token_counts
from saelab.eval.evaluate import evaluate_sae
from saelab.eval.spliced import spliced_metrics
from saelab.io import save_sae
from saelab.report import table, write_report, write_results
from saelab.train import fit, log_summary, make_logger, run_dir_of, wandb_scope

SAES = ("general", "erm", "term")


def _text_data(cfg: DictConfig, corpus, val_corpus, **overrides):
    """The configured text datamodule on given corpora (Corpus objects are passed as-is, not as config)."""
    d = OmegaConf.to_container(cfg.data, resolve=True)
    kwargs = {k: v for k, v in d.items() if k not in ("_target_", "host", "corpus", "val_corpus")}
    kwargs.update(overrides)
    return get_class(cfg.data._target_)(
        host=instantiate(cfg.data.host), corpus=corpus, val_corpus=val_corpus, **kwargs
    )


def _stage_cfg(cfg: DictConfig, updates: dict) -> DictConfig:
    c = copy.deepcopy(cfg)
    with open_dict(c):
        for k, v in updates.items():
            OmegaConf.update(c, k, v, merge=False)
    return c


def _finetune_terms(cfg: DictConfig, tilted: bool) -> DictConfig:
    """The objective's terms, with `mse` replaced by the configured `tilted` term for TERM."""
    terms = OmegaConf.to_container(cfg.objective.terms, resolve=True) or {}
    if tilted:
        terms.pop("mse", None)
        terms.pop("fvu", None)
        terms["tilted"] = OmegaConf.to_container(cfg.ssae.finetune.tilted, resolve=True)
    return OmegaConf.create(terms)


def _selection_stats(selected, pool, hidden_ids: set[str]) -> dict:
    """Size, source mix and precision/recall against the domain documents hidden in the pool."""
    from saelab.corpora.selection import retrieval_metrics

    sources: dict[str, int] = {}
    for i in selected.ids:
        src, _, rest = i.partition(":")
        src = rest.split("/", 1)[0] if src == "newsgroup" else src
        sources[src] = sources.get(src, 0) + 1
    rm = retrieval_metrics(selected.ids, sorted(hidden_ids & set(pool.ids)))
    return {
        "n_docs": len(selected),
        "n_words": selected.n_words,
        "hidden_domain_docs_in_pool": rm["n_relevant"],
        "precision_hidden": rm["precision"],
        "recall_hidden": rm["recall"],
        "sources": dict(sorted(sources.items(), key=lambda kv: -kv[1])),
    }


def _select(cfg: DictConfig, run_dir: Path, pool) -> tuple[object, dict]:
    """Dense retrieval of the subdomain (and the BM25 baseline) from `pool`; returns (dense selection, stats)."""
    from saelab.corpora.selection import select_bm25, select_dense

    s = cfg.ssae.selection
    seed = instantiate(cfg.ssae.seed_corpus)
    hidden = set(instantiate(cfg.ssae.hidden_corpus).ids) if cfg.ssae.get("hidden_corpus") else set()
    stats: dict = {"seed_docs": len(seed), "pool_docs": len(pool)}
    chosen = None
    for method in ["dense", *([s.baseline] if s.get("baseline") else [])]:
        t0 = time.perf_counter()
        if method == "dense":
            sel = chosen = select_dense(
                seed,
                pool,
                int(s.n_docs),
                s.aggregate,
                max_length=int(s.max_length),
                batch_size=int(s.batch_size),
            )
        elif method == "bm25":
            sel = select_bm25(seed, pool, int(s.n_docs), s.aggregate)
        else:
            raise ValueError(f"ssae.selection.baseline must be bm25 or null, got {method!r}.")
        stats[method] = {**_selection_stats(sel, pool, hidden), "seconds": time.perf_counter() - t0}
        sel.save(run_dir / "select" / f"{method}.json")
    return chosen, stats


class AtK(torch.nn.Module):
    """A TopK-family SAE evaluated at another k (inference-time sparsity sweep for the perplexity-vs-L0 curve)."""

    def __init__(self, sae: torch.nn.Module, k: int) -> None:
        super().__init__()
        self.sae, self.k = sae, int(k)

    def forward(self, x):
        act = self.sae.activation
        old = act.k
        act.k = self.k
        try:
            return self.sae(x)
        finally:
            act.k = old


@torch.no_grad()
def _l0(sae, batches, n_batches: int) -> float:
    """Mean active latents per token over the first n batches."""
    tot, n = 0.0, 0
    for i, b in enumerate(batches):
        if i >= n_batches:
            break
        out = sae(b["acts"])
        tot, n = tot + float(out.l0.sum()), n + out.l0.numel()
    return tot / max(1, n)


def _eval_sets(cfg: DictConfig, general_dm, test_corpus) -> dict:
    e = cfg.ssae.eval
    domain = _text_data(cfg, general_dm.corpus, test_corpus, val_tokens=e.domain_tokens)
    general = _text_data(cfg, general_dm.corpus, general_dm.val_corpus, val_tokens=e.general_tokens)
    return {"domain": domain, "general": general}


def _spliced_contexts(dm, n_tokens: int):
    ctx = dm.contexts("val")
    per = max(1, int(ctx.sae_mask[0].sum()))
    return ctx.slice(0, max(1, math.ceil(n_tokens / per)))


def run(cfg: DictConfig) -> dict:
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    s = cfg.ssae
    general_corpus = instantiate(cfg.data.corpus)
    general_val = instantiate(cfg.data.val_corpus)
    test_corpus = instantiate(s.test_corpus)
    results: dict = {"name": cfg.name, "stages": {}}
    saes: dict = {}

    # 1. general SAE on the general corpus ------------------------------------------------------------
    gdm = _text_data(cfg, general_corpus, general_val)
    res = fit(cfg, run_dir, stage="general", datamodule=gdm)
    with wandb_scope(res.logger):
        saes["general"] = res.sae
        export = save_sae(
            res.sae, run_dir / "general" / "sae", metadata={"saelab_run": cfg.name, "stage": "general"}
        )
        results["stages"]["general"] = {
            "seconds": res.seconds,
            "steps": int(res.trainer.global_step),
            "export": export,
        }
        log_summary(res.logger, {"train/seconds": res.seconds})

    # 2. data selection --------------------------------------------------------------------------------
    t0 = time.perf_counter()
    pool = general_corpus
    if s.selection.get("pool_max_docs"):
        pool = general_corpus.subset(range(min(len(general_corpus), int(s.selection.pool_max_docs))))
    selected, sel_stats = _select(cfg, run_dir, pool)
    sel_stats["seconds"] = time.perf_counter() - t0
    results["selection"] = sel_stats
    logger = make_logger(cfg, run_dir, "select")
    with wandb_scope(logger):
        flat = {
            f"select/{m}/{k}": v for m in ("dense", "bm25") if m in sel_stats for k, v in sel_stats[m].items()
        }
        log_summary(logger, flat)

    # 3–4. fine-tunes from the general export: ERM (objective as configured) and TERM (tilted) ---------------
    ft = s.finetune
    for stage, tilted in (("erm", False), ("term", True)):
        scfg = _stage_cfg(
            cfg,
            {
                "sae.init_from": str(export),
                "trainer.max_steps": int(ft.max_steps),
                "optim.optimizer.lr": float(ft.lr),
                "objective.terms": _finetune_terms(cfg, tilted),
            },
        )
        dm = _text_data(
            scfg, selected, test_corpus, train_tokens=int(ft.train_tokens), val_tokens=int(ft.val_tokens)
        )
        r = fit(scfg, run_dir, stage=stage, datamodule=dm)
        with wandb_scope(r.logger):
            saes[stage] = r.sae
            exp = save_sae(r.sae, run_dir / stage / "sae", metadata={"saelab_run": cfg.name, "stage": stage})
            results["stages"][stage] = {
                "seconds": r.seconds,
                "steps": int(r.trainer.global_step),
                "export": exp,
            }
            log_summary(r.logger, {"train/seconds": r.seconds})

    # 5. evaluation --------------------------------------------------------------------------------------
    e = s.eval
    sets = _eval_sets(cfg, gdm, test_corpus)
    counts = token_counts(gdm.token_ids("train"), len(gdm.host.tokenizer))
    metrics: dict = {}
    sweep: dict = {name: [] for name in SAES}
    for dom, dm in sets.items():
        for name, sae in saes.items():
            ev = evaluate_sae(sae, dm.val_dataloader(), None)
            ev.pop("density")
            metrics.setdefault(name, {})[dom] = {
                k: ev[k] for k in ("l0", "explained_variance", "fvu", "dead_frac")
            }
        n_spliced = int(e.spliced_tokens if dom == "domain" else e.general_spliced_tokens)
        if n_spliced <= 0:
            continue
        ctx = _spliced_contexts(dm, n_spliced)
        runs = dict(saes)
        ks = [int(k) for k in (e.get("l0_sweep") or [])] if dom == "domain" else []
        for name, sae in saes.items():
            if hasattr(sae, "activation") and hasattr(sae.activation, "k"):
                for k in ks:
                    runs[f"{name}@k={k}"] = AtK(sae, k)
        sp = spliced_metrics(
            dm.host,
            runs,
            ctx.input_ids,
            ctx.attention_mask,
            ctx.sae_mask,
            e.spliced_batch,
            f"spliced eval ({dom})",
        )
        for name in saes:
            metrics[name][dom].update(sp[name])
        for run_name, wrapped in runs.items():
            if "@k=" not in run_name:
                continue
            name = run_name.split("@", 1)[0]
            l0 = _l0(wrapped, dm.val_dataloader(), 4)
            sweep[name].append((l0, sp[run_name]["spliced_ppl"]))
    cov_cfg = OmegaConf.to_container(e.coverage, resolve=True)
    for name, sae in saes.items():
        cov = sae_coverage(sae, sets["domain"].val_dataloader(), counts, **cov_cfg)
        metrics[name]["domain"]["coverage"] = cov.to_dict()
    for name in saes:
        d = metrics[name]["domain"]
        sweep[name].append((d["l0"], d.get("spliced_ppl", float("nan"))))
        sweep[name].sort()
    results["metrics"] = metrics
    results["ppl_vs_l0"] = {
        name: [{"l0": a, "spliced_ppl": b} for a, b in pts] for name, pts in sweep.items()
    }

    # report ---------------------------------------------------------------------------------------------
    plots.scatter(
        {n: ([a for a, _ in pts], [b for _, b in pts]) for n, pts in sweep.items()},
        run_dir / "ppl_vs_l0.png",
        "L0",
        "in-domain spliced perplexity",
        "Perplexity vs L0 (held-out domain text)",
    )
    bins = metrics["general"]["domain"]["coverage"]["bins"]
    plots.bars(
        [
            f"{b} ({n})"
            for b, n in zip(bins, metrics["general"]["domain"]["coverage"]["bin_tokens"], strict=True)
        ],
        {
            n: [0.0 if v is None or v != v else v for v in metrics[n]["domain"]["coverage"]["coverage"]]
            for n in SAES
        },
        run_dir / "coverage.png",
        "share of tokens with a capturing latent",
        "Tail-token coverage by corpus-frequency bin (domain test)",
    )
    headers, rows = _comparison(metrics)
    cov_headers, cov_rows = _coverage_table(metrics)
    results["seconds"] = time.perf_counter() - t_start
    write_results(run_dir, results)
    sel_rows = [
        [
            m,
            v["n_docs"],
            v["n_words"],
            v["precision_hidden"],
            v["recall_hidden"],
            ", ".join(f"{k}:{c}" for k, c in v["sources"].items()),
        ]
        for m, v in sel_stats.items()
        if isinstance(v, dict)
    ]
    sel_table = table(
        ["method", "docs", "words", "precision (hidden domain docs)", "recall", "sources"], sel_rows
    )
    write_report(
        run_dir,
        f"Specialized SAEs: {cfg.name}",
        [
            ("Comparison", table(headers, rows)),
            (
                "Tail-token coverage (domain test, bins = token count in the general training data)",
                table(cov_headers, cov_rows) + "\n\n![coverage by frequency bin](coverage.png)",
            ),
            ("Perplexity vs L0", "![perplexity vs L0](ppl_vs_l0.png)"),
            (
                "Data selection",
                f"Seed docs: {sel_stats['seed_docs']}, pool docs: {sel_stats['pool_docs']}.\n\n{sel_table}",
            ),
            ("Artifacts", "\n".join(f"- `{n}`: `{results['stages'][n]['export']}`" for n in SAES)),
        ],
    )
    logger = make_logger(cfg, run_dir, "eval")
    with wandb_scope(logger):
        flat = {
            f"{n}/{dom}/{k}": v
            for n in SAES
            for dom in metrics[n]
            for k, v in metrics[n][dom].items()
            if isinstance(v, (int, float))
        }
        log_summary(logger, flat)
    print(table(headers, rows))
    print()
    print(table(cov_headers, cov_rows))
    print(f"run dir: {run_dir}  ({results['seconds']:.0f} s)")
    return results


def _comparison(metrics: dict) -> tuple[list[str], list[list]]:
    headers = [
        "SAE",
        "domain ppl",
        "domain ce_loss_score",
        "domain kl_score",
        "L0",
        "EV (domain)",
        "EV (general)",
        "general ppl",
        "general ce_loss_score",
        "dead frac",
        "coverage (domain)",
    ]
    rows = []
    for n in SAES:
        d, g = metrics[n]["domain"], metrics[n]["general"]
        rows.append(
            [
                n,
                d.get("spliced_ppl", float("nan")),
                d.get("ce_loss_score", float("nan")),
                d.get("kl_score", float("nan")),
                d["l0"],
                d["explained_variance"],
                g["explained_variance"],
                g.get("spliced_ppl", float("nan")),
                g.get("ce_loss_score", float("nan")),
                d["dead_frac"],
                d["coverage"]["total_coverage"],
            ]
        )
    clean = metrics["general"]["domain"].get("clean_ppl")
    if clean is not None:
        rows.append(
            [
                "(clean model)",
                clean,
                1.0,
                1.0,
                "",
                "",
                "",
                metrics["general"]["general"].get("clean_ppl", ""),
                1.0,
                "",
                "",
            ]
        )
    return headers, rows


def _coverage_table(metrics: dict) -> tuple[list[str], list[list]]:
    cov = metrics["general"]["domain"]["coverage"]
    headers = ["corpus count", "test tokens", *SAES]
    rows = []
    for i, (b, n) in enumerate(zip(cov["bins"], cov["bin_tokens"], strict=True)):
        if n == 0:  # no test token falls in this frequency bin: nothing to report
            continue
        rows.append([b, n, *[metrics[s]["domain"]["coverage"]["coverage"][i] for s in SAES]])
    return headers, rows
