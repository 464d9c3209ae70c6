"""Protein SAE recipe: Villegas Garcia & Ansuini, "Interpreting and Steering Protein Language Models
through Sparse Autoencoders" (arXiv:2502.09135).

harvest residue activations of a masked protein LM on annotated Swiss-Prot entries → train an SAE →
fidelity with the SAE spliced in (sequence recovery, KL, ΔCE) → per latent × annotation enrichment
(one-sided Fisher, BH FDR) at several activation thresholds → steer generation with the latents
enriched for a target annotation, scored against unsteered generations → results.json, plots,
report.md, W&B summary.
"""

from __future__ import annotations

import time

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from saelab.analysis import plots
from saelab.analysis.enrichment import count_contingency, enrichment, heatmap
from saelab.analysis.protein_steering import LatentClamp, compare, generate, score_generations, scorer_for
from saelab.eval.evaluate import evaluate_sae
from saelab.eval.protein_fidelity import protein_fidelity
from saelab.io import save_sae
from saelab.report import table, write_report, write_results
from saelab.train import fit, log_summary, run_dir_of, wandb_scope

DOMAIN_NOTE = (
    "The offline host is AntiBERTy (antiberty==0.1.3), a masked LM trained on antibody sequences, not "
    "ESM-2: its latents are read on general Swiss-Prot proteins it never saw in training, on ~125 "
    "Swiss-Prot entries (emboss-test), so enrichment here is a weaker setting than the paper's ESM-2 8M "
    "on Swiss-Prot. Run `data/host=esm2_8m` (online) for the paper's model."
)


@torch.no_grad()
def _code_chunks(sae, acts: torch.Tensor, labels: torch.Tensor, chunk: int, maxima: torch.Tensor):
    """(codes, labels) per chunk of residues; updates the per-latent maximum activation in place."""
    for s in range(0, len(acts), chunk):
        codes = sae.encode(acts[s : s + chunk])  # [chunk, d_sae]
        torch.maximum(maxima, codes.max(0).values, out=maxima)
        yield codes, labels[s : s + chunk]


def run(cfg: DictConfig) -> dict:
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    pc = cfg.protein
    t_start = time.perf_counter()
    dm = instantiate(cfg.data)
    t0 = time.perf_counter()
    dm.setup()
    host = dm.host
    harvest_s = time.perf_counter() - t0
    print(
        f"harvested {len(dm.acts)} residues of {len(dm.records)} sequences from {host.name} at {host.hook} "
        f"({harvest_s:.0f}s); {len(dm.val_seqs)} sequences held out"
    )
    res = fit(cfg, run_dir, stage="train", datamodule=dm)
    sae = res.sae.eval()
    with wandb_scope(res.logger):
        # ---------------------------------------------------------------- reconstruction + fidelity
        ev = evaluate_sae(sae, dm.val_dataloader(), None)
        density = ev.pop("density")
        metrics = {f"eval/{k}": v for k, v in ev.items()}
        t0 = time.perf_counter()
        fid = protein_fidelity(
            host,
            sae,
            dm.scale,
            dm.val_sequences(),
            pc.fidelity.mask_fraction,
            pc.fidelity.batch_size,
            cfg.seed,
        )
        metrics.update({f"fidelity/{k}": v for k, v in fid.items()})
        fidelity_s = time.perf_counter() - t0

        # ---------------------------------------------------------------- enrichment
        thresholds = [float(t) for t in pc.thresholds]
        ti = int(pc.threshold_index)
        maxima = torch.zeros(sae.d_sae)
        counts = count_contingency(
            _code_chunks(sae, dm.acts, dm.labels, int(pc.encode_batch), maxima), thresholds, dm.label_names
        )
        enr = enrichment(counts)
        n_sig = enr.n_significant(pc.alpha)  # [T, A]
        enrich_rows, enrich_json = [], {}
        for a, name in enumerate(enr.names):
            top = enr.top(name, ti, int(pc.top_k), pc.alpha)
            best = top[0] if top else None
            enrich_rows.append(
                [
                    name,
                    int(counts.n_pos[a]),
                    *[int(n_sig[t, a]) for t in range(len(thresholds))],
                    f"{best['latent']} (P {best['precision']:.2f}, R {best['recall']:.2f})" if best else "-",
                ]
            )
            enrich_json[name] = {
                "residues": int(counts.n_pos[a]),
                "n_significant": {f"{t:g}": int(n_sig[i, a]) for i, t in enumerate(thresholds)},
                "top": top,
            }
            metrics[f"enrichment/n_sig/{name}"] = int(n_sig[ti, a])
        heatmap(enr, run_dir / "enrichment_heatmap.png", ti, per_annotation=3, alpha=pc.alpha)

        # ---------------------------------------------------------------- steering
        st = pc.steering
        t0 = time.perf_counter()
        steering: dict = {}
        baseline = None
        for target in st.targets:
            scorer_for(target)  # unknown targets fail before any generation
            if target not in enr.names:
                steering[target] = {"skipped": f"{target} is not among the annotation labels"}
                continue
            latents = enr.ranked(target, ti, pc.alpha, by=st.select, min_support=int(st.min_support))
            latents = latents[: int(st.n_latents)]
            if not latents:
                steering[target] = {"skipped": f"no latent passes FDR {pc.alpha} for {target}", "latents": []}
                continue
            if baseline is None:  # the unsteered generations are shared by every target
                baseline = generate(
                    host, st.n, st.length, st.rounds, st.temperature, cfg.seed, None, st.seed_sequence
                )
            entry = {
                "latents": latents,
                "max_activation": [float(maxima[j]) for j in latents],
                "baseline": score_generations(baseline, target),
                "steered": {},
            }
            for c in st.strengths:
                clamp = LatentClamp(
                    sae, latents, [float(c) * float(maxima[j]) for j in latents], dm.scale, st.mode
                )
                seqs = generate(
                    host, st.n, st.length, st.rounds, st.temperature, cfg.seed, clamp, st.seed_sequence
                )
                sc = score_generations(seqs, target)
                sc["p_vs_baseline"] = compare(sc, entry["baseline"])
                sc["examples"] = seqs[:3]
                entry["steered"][f"{float(c):g}"] = sc
                metrics[f"steering/{target}/success_rate/c={float(c):g}"] = sc["success_rate"]
            metrics[f"steering/{target}/success_rate/baseline"] = entry["baseline"]["success_rate"]
            entry["baseline_examples"] = baseline[:3]
            steering[target] = entry
        steering_s = time.perf_counter() - t0

        # ---------------------------------------------------------------- artifacts
        metrics["train/seconds"] = res.seconds
        metrics["train/steps"] = int(res.trainer.global_step)
        metrics["time/harvest_s"], metrics["time/fidelity_s"], metrics["time/steering_s"] = (
            harvest_s,
            fidelity_s,
            steering_s,
        )
        metrics["time/total_s"] = time.perf_counter() - t_start
        export = None
        if cfg.export:
            export = save_sae(
                sae,
                run_dir / "sae",
                metadata={
                    "saelab_run": cfg.name,
                    "host": host.name,
                    "hook": host.hook,
                    "act_scale": dm.scale,
                },
            )
        plots.density_histogram(density, run_dir / "density.png")
        figures = ["![latent density](density.png)", "![enrichment heat map](enrichment_heatmap.png)"]
        done = {t: e for t, e in steering.items() if "steered" in e}
        if done:
            strengths = [f"{float(c):g}" for c in st.strengths]
            series = {"unsteered": [e["baseline"]["success_rate"] for e in done.values()]}
            for c in strengths:
                series[f"c={c}"] = [e["steered"][c]["success_rate"] for e in done.values()]
            plots.bars(
                list(done),
                series,
                run_dir / "steering.png",
                "success rate",
                "Steered vs unsteered generation",
            )
            figures.append("![steering](steering.png)")
        results = {
            "name": cfg.name,
            "host": {"name": host.name, "hook": host.hook, "d_in": host.d_in, "act_scale": dm.scale},
            "data": {
                "sequences": len(dm.records),
                "residues": len(dm.acts),
                "val_sequences": len(dm.val_seqs),
                "labels": dm.label_names,
            },
            "metrics": metrics,
            "enrichment": {
                "thresholds": thresholds,
                "headline_threshold": thresholds[ti],
                "alpha": pc.alpha,
                "annotations": enrich_json,
            },  # fmt: skip
            "steering": steering,
            "export": str(export) if export else None,
        }
        write_results(run_dir, results)
        headers = [
            "annotation",
            "residues",
            *[f"latents q<{pc.alpha:g} (τ={t:g})" for t in thresholds],
            "best latent",
        ]
        enrich_md = table(headers, enrich_rows)
        steer_md = _steering_table(steering)
        fid_md = table(
            ["metric", "value"],
            [[k, v] for k, v in fid.items()]
            + [[k, ev[k]] for k in ("explained_variance", "l0", "dead_frac") if k in ev],
        )
        notes = [DOMAIN_NOTE] if host.name == "antiberty" else []
        notes.append(
            f"Host {host.name}, hook {host.hook} (d_in {host.d_in}); {len(dm.records)} sequences "
            f"({len(dm.acts)} residues), {len(dm.val_seqs)} held out for fidelity. Enrichment counts every "
            f"residue; BH over all latents × annotations per threshold; best latent ranked by F1 at τ={thresholds[ti]:g}. "
            "The Fisher test treats residues as independent, but annotations are contiguous regions inside "
            "proteins (and latents often fire on whole proteins), so the counts of significant latents are "
            "generous; the precision/recall columns show the effect sizes. Steering clamps the "
            f"{st.n_latents} latents of highest {st.select} (q < {pc.alpha:g}, at least {st.min_support} "
            "annotated active residues)."
        )
        write_report(
            run_dir,
            f"saelab run: {cfg.name}",
            [
                ("Setting", "\n\n".join(notes)),
                ("Fidelity (SAE spliced in, held-out sequences)", fid_md),
                ("Annotation enrichment", enrich_md),
                ("Steering", steer_md + f"\n\nCriteria: {_criteria(steering)}"),
                ("Figures", "\n\n".join(figures)),
                (
                    "Artifacts",
                    f"- SAE export (SAELens format): `{export}`\n- checkpoints: `checkpoints/train/`",
                ),
            ],
        )
        log_summary(res.logger, metrics)
        print(enrich_md)
        print(steer_md)
        print(fid_md)
        print(f"total {metrics['time/total_s']:.0f}s; run dir: {run_dir}")
    return results


def _steering_table(steering: dict) -> str:
    rows = []
    for target, e in steering.items():
        if "steered" not in e:
            rows.append([target, "-", "-", "-", "-", e.get("skipped", "")])
            continue
        b = e["baseline"]
        for c, sc in e["steered"].items():
            rows.append(
                [
                    target,
                    ",".join(map(str, e["latents"])),
                    c,
                    f"{sc['successes']}/{sc['n']} ({sc['mean_score']:.3g})",
                    f"{b['successes']}/{b['n']} ({b['mean_score']:.3g})",
                    f"{sc['p_vs_baseline']:.3g}",
                ]
            )
    headers = ["target", "latents", "clamp c", "steered hits (score)", "unsteered hits (score)", "Fisher p"]
    return table(headers, rows)


def _criteria(steering: dict) -> str:
    out = []
    for target in steering:
        try:
            out.append(f"{target}: {scorer_for(target)[2]}")
        except ValueError:
            continue
    return "; ".join(out) if out else "-"
