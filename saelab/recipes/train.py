"""The default recipe: one stage (train an SAE, export it, run the configured evaluators), then a report."""

from __future__ import annotations

from omegaconf import DictConfig

from saelab.report import Report
from saelab.stage import StageResult, train_stage
from saelab.train import run_dir_of


def run(cfg: DictConfig) -> dict:
    run_dir = run_dir_of(cfg)

    def report(stage: StageResult) -> Report:
        r = Report(run_dir, f"saelab run: {cfg.name}", cfg.name)
        r.add_metrics(stage.metrics).add_metrics_table()
        r.add_eval(stage.eval, metrics=False)
        r.add_data("export", stage.export)
        return r.add_text(
            "Artifacts",
            f"- SAE export (SAELens format): `{stage.export}`\n- checkpoints: `checkpoints/train/`",
        )

    stage = train_stage(cfg, run_dir, "train", export_dir=run_dir / "sae", out_dir=run_dir, report=report)
    return stage.results
