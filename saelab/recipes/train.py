"""The default recipe: train one SAE, evaluate it on held-out activations, export it, report."""

from __future__ import annotations

from omegaconf import DictConfig

from saelab.analysis import plots
from saelab.eval.evaluate import evaluate_sae
from saelab.io import save_sae
from saelab.report import table, write_report, write_results
from saelab.train import fit, log_summary, run_dir_of, wandb_scope


def run(cfg: DictConfig) -> dict:
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    res = fit(cfg, run_dir, stage="train")
    if not res.trainer.is_global_zero:  # under DDP only rank 0 evaluates, exports and reports
        return {}
    with wandb_scope(res.logger):
        dm, sae = res.datamodule, res.sae
        truth = getattr(dm, "true_features", None)
        ev = evaluate_sae(
            sae,
            dm.val_dataloader(),
            cfg.eval.n_batches,
            truth,
            recovery_threshold=cfg.eval.recovery_threshold,
        )
        density = ev.pop("density")
        scores = ev.pop("recovery_scores", None)
        metrics = {f"eval/{k}": v for k, v in ev.items()}
        metrics["train/seconds"] = res.seconds
        metrics["train/steps"] = int(res.trainer.global_step)
        export = None
        if cfg.export:
            export = save_sae(
                sae, run_dir / "sae", metadata={"saelab_run": cfg.name, "d_in_source": cfg.data._target_}
            )
        plots.density_histogram(density, run_dir / "density.png")
        figures = ["![latent density](density.png)"]
        if scores is not None:
            plots.histogram(
                scores, run_dir / "recovery.png", "max cos(true feature, decoder rows)", "Feature recovery"
            )
            figures.append("![feature recovery](recovery.png)")
        results = {"name": cfg.name, "metrics": metrics, "export": str(export) if export else None}
        write_results(run_dir, results)
        write_report(
            run_dir,
            f"saelab run: {cfg.name}",
            [
                ("Metrics", table(["metric", "value"], sorted(metrics.items()))),
                ("Figures", "\n\n".join(figures)),
                (
                    "Artifacts",
                    f"- SAE export (SAELens format): `{export}`\n- checkpoints: `checkpoints/train/`",
                ),
            ],
        )
        log_summary(res.logger, metrics)
        print(table(["metric", "value"], sorted(metrics.items())))
        print(f"run dir: {run_dir}")
    return results
