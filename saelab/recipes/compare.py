"""Train several SAE variants on the same activation source and compare them side by side.

Used for OrtSAE (arXiv:2509.22033: BatchTopK vs BatchTopK + orthogonality term) and Matryoshka SAEs
(arXiv:2503.17547: nested-prefix losses) against BatchTopK. `compare.variants` maps a name to a list of
Hydra overrides applied on top of the experiment (e.g. `objective/terms=[mse,auxk,ortho]`); every
variant sees the same batches in the same order. Reported per variant: explained variance, L0, dead
fraction, MeanCosSim (mean max decoder cosine), and on the synthetic source feature recovery and
ground-truth absorption (`saelab.analysis.absorption`).
"""

from __future__ import annotations

import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from saelab.analysis import plots
from saelab.analysis.absorption import synthetic_absorption
from saelab.eval.evaluate import evaluate_sae
from saelab.io import save_sae
from saelab.report import table, write_report, write_results
from saelab.train import fit, log_summary, run_dir_of, wandb_scope

COLUMNS = [
    "explained_variance",
    "l0",
    "dead_frac",
    "mean_max_cos",
    "feature_recovery",
    "frac_recovered",
    "absorption",
]


def _variant_cfg(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The experiment's config re-composed with the variant's overrides appended."""
    base = (
        list(HydraConfig.get().overrides.task)
        if HydraConfig.initialized()
        else list(cfg.compare.base_overrides)
    )
    return compose(config_name="config", overrides=[*base, *overrides])


def run(cfg: DictConfig) -> dict:
    run_dir = run_dir_of(cfg)
    rows, results = [], {}
    for name, overrides in cfg.compare.variants.items():
        vcfg = _variant_cfg(cfg, list(overrides))
        res = fit(vcfg, run_dir, stage=name)
        with wandb_scope(res.logger):
            dm, sae = res.datamodule, res.sae
            ev = evaluate_sae(
                sae, dm.val_dataloader(), vcfg.eval.n_batches, getattr(dm, "true_features", None)
            )
            ev.pop("density")
            ev.pop("recovery_scores", None)
            if hasattr(dm, "features"):  # synthetic: absorption against the true parent/child structure
                feats = dm.features
                x, coeffs = feats.sample(8192, -1000)
                with torch.no_grad():
                    codes = sae.eval()(x).codes
                ev.update(synthetic_absorption(codes, coeffs, sae.W_dec, feats.directions, feats.parent_of))
            ev["train_seconds"] = res.seconds
            save_sae(sae, run_dir / name / "sae", metadata={"saelab_run": cfg.name, "variant": name})
            log_summary(res.logger, {f"eval/{k}": v for k, v in ev.items() if isinstance(v, float)})
        results[name] = ev
        rows.append([name, *[ev.get(c, float("nan")) for c in COLUMNS]])
    names = list(results)
    plots.bars(
        ["explained_variance", "mean_max_cos", "absorption"],
        {
            n: [results[n].get(k, 0.0) for k in ("explained_variance", "mean_max_cos", "absorption")]
            for n in names
        },
        run_dir / "compare.png",
        "value",
        "Variants on the same activations",
    )
    md = table(["variant", *COLUMNS], rows)
    write_results(run_dir, {"name": cfg.name, "variants": results})
    write_report(
        run_dir,
        f"saelab comparison: {cfg.name}",
        [("Results", md), ("Figure", "![comparison](compare.png)"), ("Definitions", __doc__ or "")],
    )
    print(md)
    print(f"run dir: {run_dir}")
    return {"name": cfg.name, "variants": results}
