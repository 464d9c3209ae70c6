"""RecSAE (arXiv:2411.06112): SASRec on MovieLens → TopK SAE on its user representation → ranking fidelity,
concept dictionaries with held-out confidence, and latent ablation.

Stages: (1) `sasrec` trains the host (`host_stage`; cached in <run>/host/sasrec.pt, keyed by its
hyper-parameters, the corpus fingerprint and `recipe.sasrec_fit`); (2) `data=recsae` harvests its frozen
user representations; (3) `sae` trains the SAE, exports it and runs `eval/metrics` (`core`; `ranking`:
HR/NDCG@K with the representation replaced by its reconstruction); (4) the concept dictionary with
held-out precision/recall/F1 (`saelab.analysis.concepts`) and zero/boost ablations of its most confident
latents (`saelab.analysis.ablation`); (5) the report.
"""

from __future__ import annotations

import time

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from saelab.analysis.ablation import ablate_concept_latents
from saelab.analysis.concepts import concept_latents
from saelab.corpora.movielens import NextItemDataModule
from saelab.eval.base import Table
from saelab.hosts.sasrec import SASRec
from saelab.report import Report
from saelab.stage import finish, host_stage, train_stage
from saelab.train import plain, run_dir_of


def run(cfg: DictConfig) -> dict:
    """The pipeline with `recipe.torch_threads` intra-op threads (null: torch's default)."""
    before = torch.get_num_threads()
    if cfg.recipe.torch_threads:
        # width-64 matmuls gain little from threads and lose much when the cores are oversubscribed
        torch.set_num_threads(int(cfg.recipe.torch_threads))
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(before)


def _run(cfg: DictConfig) -> dict:
    run_dir, rc, t0 = run_dir_of(cfg), cfg.recipe, time.perf_counter()
    if "ranking" not in (cfg.eval.metrics or {}):
        raise ValueError("the recsae recipe reports ranking fidelity: add `ranking` to eval/metrics.")
    corpus = instantiate(cfg.data.corpus)
    host = instantiate(cfg.data.host, _convert_="all")(n_items=corpus.n_items)
    if not isinstance(host, SASRec):
        raise TypeError(f"the recsae recipe trains a SASRec host (data.host), got {type(host).__name__}.")
    fit = plain(rc.sasrec_fit)
    hparams = {k: v for k, v in plain(cfg.data.host).items() if k[0] != "_"}
    host, host_info = host_stage(
        cfg, run_dir, "sasrec", host, NextItemDataModule(corpus, host.max_len, fit["batch_size"], cfg.seed),
        key={"hparams": hparams, "corpus": corpus.fingerprint, "fit": fit},
        monitor=f"val/ndcg@{max(host.ks)}", max_epochs=fit["max_epochs"], log_every_n_steps=10,
    )  # fmt: skip
    dm = instantiate(cfg.data, _recursive_=False, _partial_=True)(host=host, corpus=corpus)
    dm.setup()
    stage = train_stage(cfg, run_dir, "sae", datamodule=dm, export_dir=run_dir / "sae", out_dir=run_dir,
                        metadata={"d_in_source": "sasrec.user_repr"})  # fmt: skip
    if not stage.is_global_zero:
        return {}
    sae, fit_rows, held_rows = stage.sae.eval(), dm.analysis["fit"], dm.analysis["heldout"]
    concepts = concept_latents(sae, fit_rows, held_rows, corpus.item_attrs, corpus.attr_names, corpus.titles,
                               **rc.concepts, act_scale=dm.act_scale)  # fmt: skip
    ablation = ablate_concept_latents(sae, held_rows, host.score, corpus.item_attrs, concepts.latents,
                                      **rc.ablation, act_scale=dm.act_scale)  # fmt: skip

    report = Report(run_dir, f"RecSAE on SASRec ({corpus.name}): {cfg.name}", cfg.name)
    report.add_metrics(stage.metrics).add_metrics(host_info).add_metrics(concepts.metrics, "concepts/")
    report.add_metrics(ablation.metrics, "ablation/").add_metrics({"data/train_rows": len(dm.train["acts"])})
    ev = stage.eval.metrics
    report.add_table("Fidelity (leave-one-out test, full ranking)", stage.eval.tables["ranking fidelity"],
                     note=f"SAE: L0 {ev['l0']:.1f}, explained variance {ev['explained_variance']:.3f}, "
                     f"dead fraction {ev['dead_frac']:.3f} on the test histories.")  # fmt: skip
    report.add_table("Most confident concept latents", Table(*concepts.table(rc.report_top)), concepts.note())
    report.add_table("Latent ablation", Table(*ablation.table()), ablation.note())
    report.add_metrics({"total_seconds": time.perf_counter() - t0}).add_metrics_table()
    report.add_eval(stage.eval, metrics=False, tables=False)
    for caption, png in (("confidence", concepts.plot(run_dir / "confidence.png")),
                         ("ablation", ablation.plot(run_dir / "ablation.png"))):  # fmt: skip
        if png is not None:
            report.add_figure(caption, png)
    report.add_data("latents", concepts.records()).add_data("ablations", ablation.runs)
    report.add_data("export", stage.export).add_text(
        "Artifacts", f"- SAE export (SAELens format): `{stage.export}`\n- SASRec: `host/sasrec.pt`\n"
        "- checkpoints: `checkpoints/sasrec/`, `checkpoints/sae/`",
    )  # fmt: skip
    results = finish(cfg, report)
    print(closing_line(results["metrics"], list(cfg.eval.metrics.ranking.ks)))
    return results


def closing_line(m: dict, ks: list[int]) -> str:
    """One line: host vs spliced HR/NDCG@10 (else @max K), EV, confident concept latents, ablation effects."""
    k = 10 if 10 in ks else max(ks)
    abl = [
        f"{mode} Δshare {m[f'ablation/{mode}_mean_delta']:+.3f} "
        f"({m[f'ablation/{mode}_n_significant']}/{m[f'ablation/{mode}_n']} significant)"
        for mode in ("zero", "boost")
        if f"ablation/{mode}_n" in m
    ]
    return (
        f"SASRec HR@{k} {m[f'eval/clean/hr@{k}']:.4f} NDCG@{k} {m[f'eval/clean/ndcg@{k}']:.4f} | with SAE "
        f"HR@{k} {m[f'eval/sae/hr@{k}']:.4f} NDCG@{k} {m[f'eval/sae/ndcg@{k}']:.4f} "
        f"(EV {m['eval/explained_variance']:.3f}) "
        f"| confident concept latents {m['concepts/n_confident']}/{m['concepts/n_with_concepts']} "
        f"| ablation: {'; '.join(abl) or 'none'}"
    )
