"""RecSAE (arXiv:2411.06112): SASRec on MovieLens → TopK SAE on its user representation → fidelity,
concept dictionaries with held-out confidence, and latent ablation.

Stages: (1) train SASRec with Lightning (stage "sasrec"; cached in <run dir>/host/sasrec.pt and reused
on resume), (2) harvest its frozen user representations (`data=recsae`), (3) train the SAE with the
standard spine (stage "sae"), (4) evaluate: HR/NDCG@K with the representation replaced by its
reconstruction, concept dictionary + precision/recall/F1 on held-out users, zero/boost ablations.
"""

from __future__ import annotations

import functools
import io
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from saelab.analysis import plots
from saelab.analysis.ablation import ablate_latent, concept_item_mask
from saelab.analysis.concepts import build_dictionary, confidence, history_profiles
from saelab.checkpoint import AtomicCheckpointIO, ConfigInCheckpoint
from saelab.corpora.movielens import Interactions, NextItemDataModule
from saelab.eval.evaluate import evaluate_sae
from saelab.files import atomic_write_bytes
from saelab.hosts.ranking import full_ranking
from saelab.io import save_sae
from saelab.report import table, write_report, write_results
from saelab.train import fit, log_summary, make_logger, run_dir_of, wandb_scope


# ---------------------------------------------------------------------- stage 1: the host
def train_host(cfg: DictConfig, run_dir: Path, corpus: Interactions, host_cfg: dict):
    """The trained SASRec: loaded from <run dir>/host/sasrec.pt when it matches, else trained and cached."""
    host = instantiate(host_cfg, n_items=corpus.n_items)
    host = host() if isinstance(host, functools.partial) else host
    fit_cfg = {"max_epochs": 15, "batch_size": 256, **OmegaConf.to_container(cfg.get("sasrec_fit") or {})}
    key = {"hparams": {k: v for k, v in host_cfg.items() if not k.startswith("_")}, "corpus": corpus.fingerprint,
           "fit": fit_cfg}  # fmt: skip
    cache = run_dir / "host" / "sasrec.pt"
    if cache.exists():
        blob = torch.load(cache, map_location="cpu", weights_only=False)
        if blob.get("key") == key:
            host.load_state_dict(blob["state_dict"])
            return host.eval().requires_grad_(False), {"sasrec/seconds": 0.0, "sasrec/cached": True}
        print(f"saelab: {cache} was trained with other settings; training SASRec again.")
    dm = NextItemDataModule(corpus, host.max_len, int(fit_cfg["batch_size"]), seed=int(cfg.seed))
    ckpt_dir = run_dir / "checkpoints" / "sasrec"
    best = pl.callbacks.ModelCheckpoint(
        dirpath=ckpt_dir, monitor=f"val/ndcg@{max(host.ks)}", mode="max", save_top_k=1, save_last=True
    )
    logger = make_logger(cfg, run_dir, "sasrec")
    with wandb_scope(logger):
        trainer = pl.Trainer(
            accelerator=cfg.trainer.get("accelerator", "cpu"),
            devices=1,
            max_epochs=int(fit_cfg["max_epochs"]),
            default_root_dir=str(run_dir),
            logger=logger if logger is not None else False,
            callbacks=[best, ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True))],
            plugins=[AtomicCheckpointIO()],
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=10,
        )
        last = ckpt_dir / "last.ckpt"
        t0 = time.perf_counter()
        trainer.fit(
            host,
            datamodule=dm,
            ckpt_path=str(last) if cfg.get("resume") == "auto" and last.exists() else None,
        )
        seconds = time.perf_counter() - t0
    if best.best_model_path:
        host.load_state_dict(
            torch.load(best.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
        )
    buf = io.BytesIO()
    torch.save({"key": key, "state_dict": host.state_dict()}, buf)
    atomic_write_bytes(cache, buf.getvalue())
    return host.eval().requires_grad_(False), {"sasrec/seconds": seconds, "sasrec/cached": False}


# ---------------------------------------------------------------------- helpers
@torch.no_grad()
def dense_codes(sae, acts: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    return torch.cat([sae.encode(acts[i : i + batch_size]) for i in range(0, len(acts), batch_size)])


def window_exclusion(windows: torch.Tensor, n_items: int) -> torch.Tensor:
    """Recommendation lists leave out padding and the items already in the history window."""
    mask = torch.zeros(len(windows), n_items + 1, dtype=torch.bool)
    mask.scatter_(1, windows, True)
    mask[:, 0] = True
    return mask


# ---------------------------------------------------------------------- the recipe
def run(cfg: DictConfig) -> dict:
    """The whole pipeline; `recsae.torch_threads` sets torch's intra-op threads for its duration."""
    threads = (cfg.get("recsae") or {}).get("torch_threads")
    before = torch.get_num_threads()
    if threads:
        # width-64 matmuls gain little from threads and lose much when the cores are oversubscribed
        torch.set_num_threads(int(threads))
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(before)


def _run(cfg: DictConfig) -> dict:
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    rc = cfg.get("recsae") or OmegaConf.create({})
    ks = tuple(int(k) for k in rc.get("ks", [5, 10, 20]))
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    host_cfg, corpus_cfg = data_cfg.pop("host"), data_cfg.pop("corpus")
    t_start = time.perf_counter()

    corpus: Interactions = instantiate(corpus_cfg)
    host, host_info = train_host(cfg, run_dir, corpus, host_cfg)
    dm = get_class(data_cfg.pop("_target_"))(**data_cfg, host=host, corpus=corpus)
    dm.setup()
    test = dm.test

    # host quality on the leave-one-out test split (full ranking)
    host_metrics, _ = full_ranking(host, test["window"], test["target"], test["exclude"], ks)

    res = fit(cfg, run_dir, stage="sae", datamodule=dm)
    with wandb_scope(res.logger):
        sae = res.sae.eval()
        ev = evaluate_sae(sae, dm.val_dataloader(), None)
        density = ev.pop("density")
        with torch.no_grad(), host.spliced(lambda u: sae(u).x_hat):
            sae_metrics, _ = full_ranking(host, test["window"], test["target"], test["exclude"], ks)
        metrics = {f"sasrec/test_{k}": v for k, v in host_metrics.items()}
        metrics |= {f"sae/test_{k}": v for k, v in sae_metrics.items()}
        metrics |= {f"eval/{k}": v for k, v in ev.items()}
        metrics |= {k: v for k, v in host_info.items() if k != "sasrec/cached"}
        metrics["sae/train_seconds"] = res.seconds
        metrics["sae/train_steps"] = int(res.trainer.global_step)
        metrics["data/train_rows"] = len(dm.train["acts"])

        # ------------------------------------------------------------------ concept dictionary
        cc = rc.get("concepts") or {}
        decay = float(cc.get("decay", 0.8))
        fit_rows, held_rows = dm.analysis["fit"], dm.analysis["heldout"]
        z_fit, z_held = dense_codes(sae, fit_rows["acts"]), dense_codes(sae, held_rows["acts"])
        p_fit = history_profiles(fit_rows["window"], corpus.item_attrs, decay)
        p_held = history_profiles(held_rows["window"], corpus.item_attrs, decay)
        dic = build_dictionary(
            z_fit, p_fit, corpus.attr_names,
            n_top=int(cc.get("n_top", 64)), min_lift=float(cc.get("min_lift", 1.5)),
            min_support=float(cc.get("min_support", 0.1)), max_concepts=int(cc.get("max_concepts", 3)),
            min_active=int(cc.get("min_active", 10)),
        )  # fmt: skip
        conf_held = confidence(dic, z_held, p_held)
        conf_fit = confidence(dic, z_fit, p_fit)
        bar = float(cc.get("confidence_bar", 0.5))
        f1 = conf_held["f1"]
        beats = f1 > conf_held["baseline_f1"]  # better than predicting "active" everywhere
        n_alive = int(((z_fit > 0).sum(0) > 0).sum())
        metrics["concepts/n_alive_latents"] = n_alive
        metrics["concepts/n_with_concepts"] = len(dic.latents)
        metrics["concepts/n_confident"] = int(((f1 >= bar) & beats).sum())
        metrics["concepts/n_confident_pr"] = int(
            ((conf_held["precision"] >= bar) & (conf_held["recall"] >= bar) & beats).sum()
        )
        metrics["concepts/n_above_baseline"] = int(beats.sum())
        metrics["concepts/mean_f1_heldout"] = float(f1.mean()) if len(f1) else 0.0
        metrics["concepts/mean_f1_fit"] = float(conf_fit["f1"].mean()) if len(f1) else 0.0

        order = torch.where(beats, f1, f1 - 2).argsort(descending=True).tolist()  # confident first, by F1
        rows_tbl, latent_records = [], []
        for r in order:
            j = int(dic.latents[r])
            tops = dic.top_rows[:, r][:12]
            examples = []
            for it in fit_rows["item"][tops].tolist():
                if corpus.titles[it] and corpus.titles[it] not in examples:
                    examples.append(corpus.titles[it])
            rec = {
                "latent": j,
                "f1": float(f1[r]),
                "precision": float(conf_held["precision"][r]),
                "recall": float(conf_held["recall"][r]),
                "f1_fit": float(conf_fit["f1"][r]),
                "baseline_f1": float(conf_held["baseline_f1"][r]),
                "confident": bool(f1[r] >= bar and beats[r]),
                "n_active_heldout": int(conf_held["n_active"][r]),
                "concepts": {a: round(lf, 3) for a, lf in zip(dic.names(r), dic.lifts[r], strict=True)},
                "examples": examples[:4],
            }
            latent_records.append(rec)
        for rec in latent_records[: int(rc.get("report_top", 15))]:
            concepts = ", ".join(f"{a} ({lf:.1f}×)" for a, lf in rec["concepts"].items())
            rows_tbl.append([rec["latent"], rec["f1"], rec["baseline_f1"], rec["precision"], rec["recall"],
                             rec["n_active_heldout"], concepts, "; ".join(rec["examples"][:3])])  # fmt: skip

        # ------------------------------------------------------------------ ablation
        ac = rc.get("ablation") or {}
        n_lat, n_users = int(ac.get("n_latents", 8)), int(ac.get("n_users", 4000))
        top_k, alpha = int(ac.get("top_k", 10)), float(ac.get("alpha", 0.05))
        reps = held_rows["acts"][:n_users]
        excl = window_exclusion(held_rows["window"][:n_users], corpus.n_items)
        z_abl = z_held[:n_users]
        ablations = []
        for r in order[:n_lat]:
            j = int(dic.latents[r])
            attr = dic.concepts[r][0]
            items = concept_item_mask(corpus.item_attrs, [attr])
            on = z_abl[:, j] > 0
            boost_value = float(ac.get("boost_scale", 2.0)) * float(z_fit[:, j].max())
            for mode, rows in (("zero", on), ("boost", ~on)):
                if int(rows.sum()) == 0:
                    continue
                out = ablate_latent(
                    sae, reps[rows], j, host.score, items, mode=mode, value=boost_value, k=top_k,
                    exclude=excl[rows], keep_error=bool(ac.get("keep_error", True)), alpha=alpha,
                )  # fmt: skip
                out.pop("deltas")
                out["concept"] = corpus.attr_names[attr]
                out["confident"] = bool(f1[r] >= bar and beats[r])
                ablations.append(out)
        zero = [a for a in ablations if a["mode"] == "zero"]
        boost = [a for a in ablations if a["mode"] == "boost"]
        for name, group in (("zero", zero), ("boost", boost)):
            if group:
                metrics[f"ablation/{name}_mean_delta"] = sum(a["delta"] for a in group) / len(group)
                metrics[f"ablation/{name}_n_significant"] = sum(a["significant"] for a in group)
                metrics[f"ablation/{name}_n"] = len(group)
        metrics["total_seconds"] = time.perf_counter() - t_start

        # ------------------------------------------------------------------ artifacts
        export = None
        if cfg.export:
            export = save_sae(
                sae, run_dir / "sae", metadata={"saelab_run": cfg.name, "d_in_source": "sasrec.user_repr"}
            )
        plots.density_histogram(density, run_dir / "density.png")
        groups = [f"{m}@{k}" for k in ks for m in ("HR", "NDCG")]
        plots.bars(
            groups,
            {"SASRec": [host_metrics[f"{m.lower()}@{k}"] for k in ks for m in ("HR", "NDCG")],
             "with SAE reconstruction": [sae_metrics[f"{m.lower()}@{k}"] for k in ks for m in ("HR", "NDCG")]},
            run_dir / "fidelity.png", "score", "Test ranking: original vs SAE-reconstructed user representation",
        )  # fmt: skip
        figures = ["![fidelity](fidelity.png)", "![latent density](density.png)"]
        if len(f1):
            plots.histogram(f1, run_dir / "confidence.png", "held-out F1 of the concept prediction",
                            "Interpretation confidence per concept latent")  # fmt: skip
            figures.append("![confidence](confidence.png)")
        if ablations:
            labels = [f"{a['latent']} {a['concept']}" for a in zero] or [
                f"{a['latent']} {a['concept']}" for a in boost
            ]
            series = {}
            if zero:
                series["zero (active users)"] = [a["delta"] for a in zero]
            if boost and len(boost) == len(labels):
                series["boost (inactive users)"] = [a["delta"] for a in boost]
            if all(len(v) == len(labels) for v in series.values()):
                plots.bars(labels, series, run_dir / "ablation.png", f"Δ share of concept items in top-{top_k}",
                           "Latent ablation")  # fmt: skip
                figures.append("![ablation](ablation.png)")

        results = {
            "name": cfg.name,
            "metrics": metrics,
            "latents": latent_records,
            "ablations": ablations,
            "export": str(export) if export else None,
        }
        write_results(run_dir, results)
        abl_rows = [[a["latent"], a["concept"], a["mode"], a["n_users"], a["share_before"], a["share_after"],
                     a["delta"], a["p_value"], a["frac_changed"]] for a in ablations]  # fmt: skip
        fid_rows = [[f"{m}@{k}", host_metrics[f"{m.lower()}@{k}"], sae_metrics[f"{m.lower()}@{k}"]]
                    for k in ks for m in ("HR", "NDCG")]  # fmt: skip
        write_report(
            run_dir,
            f"RecSAE on SASRec ({corpus.name}): {cfg.name}",
            [
                ("Fidelity (leave-one-out test, full ranking)",
                 table(["metric", "SASRec", "with SAE reconstruction"], fid_rows)
                 + f"\n\nSAE: L0 {ev['l0']:.1f}, explained variance {ev['explained_variance']:.3f}, "
                 f"dead fraction {ev['dead_frac']:.3f} on the test histories."),
                ("Most confident concept latents",
                 f"{metrics['concepts/n_with_concepts']} of {n_alive} live latents have a concept set; "
                 f"{metrics['concepts/n_confident']} reach held-out F1 ≥ {bar} and beat the 'always active' "
                 f"predictor (precision and recall ≥ {bar}: {metrics['concepts/n_confident_pr']}). The dictionary "
                 f"is built on {len(fit_rows['acts'])} histories of half the users and scored on "
                 f"{len(held_rows['acts'])} histories of the other half. Concepts are attributes whose "
                 f"recency-weighted share (decay {decay}) in the latent's top-activating histories exceeds "
                 "their background share (lift); example movies are the newest items of those histories.\n\n"
                 + table(["latent", "F1", "F1 of 'always active'", "precision", "recall", "active (held-out)",
                          "concepts (lift)", "example movies"], rows_tbl)),
                ("Latent ablation",
                 f"Δ = change in the share of top-{top_k} recommendations carrying the latent's first concept; "
                 "zero on histories where the latent is active, boost (to "
                 f"{float(ac.get('boost_scale', 2.0))}× its largest fit-split activation) where it is not; "
                 + ("the change D(z') − D(z) is added to the original representation"
                    if bool(ac.get("keep_error", True)) else "D(z') is compared with D(z)")
                 + "; p from a paired t-test over histories.\n\n"
                 + table(["latent", "concept", "mode", "users", "share before", "share after", "Δ", "p",
                          "lists changed"], abl_rows)),
                ("Metrics", table(["metric", "value"], sorted(metrics.items()))),
                ("Figures", "\n\n".join(figures)),
                ("Artifacts", f"- SAE export (SAELens format): `{export}`\n- SASRec: `host/sasrec.pt`\n"
                              "- checkpoints: `checkpoints/sasrec/`, `checkpoints/sae/`"),
            ],
        )  # fmt: skip
        log_summary(res.logger, metrics)
        print(table(["metric", "value"], sorted(metrics.items())))
        print(closing_note(metrics, ks))
        print(f"run dir: {run_dir}")
    return results


def closing_note(m: dict, ks) -> str:
    k = 10 if 10 in ks else max(ks)
    z, b = m.get("ablation/zero_mean_delta"), m.get("ablation/boost_mean_delta")
    abl = []
    if z is not None:
        abl.append(
            f"zero Δshare {z:+.3f} ({m['ablation/zero_n_significant']}/{m['ablation/zero_n']} significant)"
        )
    if b is not None:
        abl.append(
            f"boost Δshare {b:+.3f} ({m['ablation/boost_n_significant']}/{m['ablation/boost_n']} significant)"
        )
    return (
        f"SASRec HR@{k} {m[f'sasrec/test_hr@{k}']:.4f} NDCG@{k} {m[f'sasrec/test_ndcg@{k}']:.4f} | with SAE "
        f"HR@{k} {m[f'sae/test_hr@{k}']:.4f} NDCG@{k} {m[f'sae/test_ndcg@{k}']:.4f} (EV {m['eval/explained_variance']:.3f}) "
        f"| confident concept latents {m['concepts/n_confident']}/{m['concepts/n_with_concepts']} "
        f"| ablation: {'; '.join(abl) or 'none'}"
    )
