"""Train several SAE variants on the same activation source and compare them side by side.

Used for OrtSAE (arXiv:2509.22033: BatchTopK vs BatchTopK + orthogonality term) and Matryoshka SAEs
(arXiv:2503.17547: nested-prefix losses) against BatchTopK. `recipe.variants` maps a name to a list of
Hydra overrides applied on top of the experiment (e.g. `objective/terms=[mse,auxk,ortho]`); every
variant is one stage and sees the same batches in the same order. The columns are evaluator metrics
(`eval/metrics`): explained variance, L0, dead fraction, MeanCosSim, and on sources with ground truth
feature recovery and absorption.
"""

from __future__ import annotations

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from saelab.analysis import plots
from saelab.report import Report, summary_table
from saelab.stage import finish, train_stage
from saelab.train import apply_debug, run_dir_of


def variant_cfg(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The experiment's config re-composed with the variant's overrides appended."""
    base = (
        list(HydraConfig.get().overrides.task)
        if HydraConfig.initialized()
        else list(cfg.recipe.base_overrides)
    )
    return apply_debug(compose(config_name="config", overrides=[*base, *overrides]))


def run(cfg: DictConfig) -> dict:
    run_dir, rc = run_dir_of(cfg), cfg.recipe
    report = Report(run_dir, f"saelab comparison: {cfg.name}", cfg.name)
    variants: dict[str, dict] = {}
    for name, overrides in rc.variants.items():
        stage = train_stage(variant_cfg(cfg, list(overrides)), run_dir, name)
        if not stage.is_global_zero:  # under DDP every rank trains every variant; only rank 0 reports
            continue
        variants[name] = {**stage.eval.metrics, "train_seconds": stage.seconds}
        report.add_metrics(stage.metrics, prefix=f"{name}/").add_eval(
            stage.eval, f"{name}/", metrics=False, tables=False, figures=False
        )
    if not variants:
        return {}
    report.add_table("Results", summary_table(variants, list(rc.columns), "variant"), terminal=True)
    fig = plots.bars(
        list(rc.plot),
        {n: [v.get(k, 0.0) for k in rc.plot] for n, v in variants.items()},
        run_dir / "compare.png",
        "value",
        "Variants on the same activations",
    )
    report.add_figure("comparison", fig).add_text("Definitions", __doc__ or "")
    report.add_data("variants", variants)
    return finish(cfg, report)
