"""What a run shows and logs: one step bar per fit, one W&B line per stage, run names, every run's config."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF, ROOT, compose_cfg
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from support import synthetic_small
from torch.utils.data import TensorDataset

import saelab.stage
from saelab.__main__ import register_sweeps
from saelab.report import Report
from saelab.stage import evaluate_stage, finish, host_stage
from saelab.train import fit, run_name

SMALL = [
    *synthetic_small(),
    "trainer.val_check_interval=6",
    "trainer.limit_val_batches=1",
]


def test_fit_shows_one_bar_of_steps_out_of_max_steps(tmp_path, capsys):
    fit(compose_cfg([*SMALL, "logger=none", "trainer.max_steps=12"]), tmp_path, stage="general")
    out = capsys.readouterr().out
    # Lightning's own bar counts an epoch's batches and reads "Epoch 0/-2" when only max_steps is set
    assert "general step 12/12" in out and "Epoch" not in out and "Validation" not in out
    assert re.search(r"loss: \d+\.\d+", out)  # the module's bar_metrics, drawn at the last step


def test_training_scalars_are_logged_at_the_step_that_computed_them(tmp_path):
    """`log_scalars` sends a step's scalars to the logger under that step (0, log_every, 2·log_every, …),
    with the loss the step returned; validation still logs through Lightning."""
    losses: dict[int, float] = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses[trainer.global_step - 1] = float(outputs["loss"])

    cfg = compose_cfg([*SMALL, "logger=csv", "trainer.max_steps=25", "lit.log_every=10"])
    fit(cfg, tmp_path, callbacks=(Record(),))
    (path,) = tmp_path.glob("csv/**/metrics.csv")
    rows = [{k: v for k, v in r.items() if v} for r in csv.DictReader(path.open())]
    train = {int(r["step"]): float(r["loss/total"]) for r in rows if "loss/total" in r}
    assert sorted(train) == [0, 10, 20]
    for step, loss in train.items():
        assert loss == pytest.approx(losses[step], rel=1e-6)
    assert all(
        {"metrics/l0", "metrics/explained_variance", "sparsity/dead_frac"} <= set(r)
        for r in rows
        if "loss/total" in r
    )
    # the rate each logged step's update used, in the same row: warm-up (s + 1) / 20 of 3e-3, then 3e-3 until
    # the decay over the last fifth (steps 20-24) scales it by (25 - s) / 5
    rates = {int(r["step"]): float(r["lr-Adam"]) for r in rows if "loss/total" in r}
    assert rates == pytest.approx({0: 3e-3 / 20, 10: 3e-3 * 11 / 20, 20: 3e-3 * 5 / 5})
    assert not any("lr-Adam" in r and "loss/total" not in r for r in rows)  # no row of its own
    assert any("val/explained_variance" in r for r in rows)


class _Host(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self.w(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_host_fit_shows_the_same_bar(tmp_path, capsys):
    dm = pl.LightningDataModule.from_datasets(TensorDataset(torch.randn(8, 2)), batch_size=4)
    host_stage(compose_cfg(["logger=none"]), tmp_path, "host", _Host(), dm, key={}, max_epochs=3)
    assert "host step 6/6" in capsys.readouterr().out  # 3 epochs of 2 batches, counted as steps


def test_fit_with_the_bar_turned_off(tmp_path, capsys):
    cfg = compose_cfg([*SMALL, "logger=none", "trainer.max_steps=4", "+trainer.enable_progress_bar=false"])
    assert fit(cfg, tmp_path).trainer.global_step == 4  # Lightning refuses a bar callback with the bar off
    assert "step" not in capsys.readouterr().out


def test_run_name_has_the_experiment_stage_and_the_jobs_overrides():
    """The three jobs of `-m +sweeps=topk_k` were all "train/train"; each now names its k."""
    overrides = [
        "+sweeps=topk_k",
        "sae.activation.k=4",
        "+run_dir=/tmp/r",
        "logger=csv",
        "optim.optimizer.lr=0.01",
    ]
    register_sweeps()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert run_name(cfg, "train") == "train/train sae.activation.k=4 optim.optimizer.lr=0.01"
    finally:
        HydraConfig.instance().cfg = None
    assert run_name(cfg, "eval") == "train/eval"  # not under @hydra.main: no overrides to name


def test_evaluation_and_report_runs_carry_the_config(tmp_path, monkeypatch):
    cfg = compose_cfg(["logger=wandb_offline", "name=cfgtest"])
    loggers: list = []
    real = saelab.stage.make_logger
    monkeypatch.setattr(saelab.stage, "make_logger", lambda *a: loggers.append(real(*a)) or loggers[-1])
    evaluate_stage(cfg, tmp_path, "eval_domain", {"sae": torch.nn.Identity()}, {"domain": object()}, {})
    finish(cfg, Report(tmp_path, "t", "cfgtest"))
    assert [lg.experiment.name for lg in loggers] == ["cfgtest/eval_domain", "cfgtest/report"]
    for lg in loggers:
        config = dict(lg.experiment.config)
        assert config["name"] == "cfgtest" and config["sae"]["d_sae"] == cfg.sae.d_sae


@pytest.mark.slow  # a `python -m saelab` run in a subprocess
def test_cli_run_prints_a_step_bar_one_wandb_line_and_titled_tables(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"} | {"WANDB_MODE": "offline"}
    args = [*SMALL, "logger=wandb_offline", "trainer.max_steps=20", "name=wb"]
    cmd = [sys.executable, "-m", "saelab", *args, f"+run_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    text = p.stdout + p.stderr
    assert "train step 20/20" in p.stdout and "Epoch" not in text and "v_num" not in text
    # W&B's start and end blocks (a dozen lines each) give way to one line, and no deprecation warning
    lines = [line for line in text.splitlines() if line.startswith("wandb:")]
    assert len(lines) == 1 and lines[0].startswith("wandb: wb/train data.d_in=32 "), lines
    assert "sae.activation.k=4" in lines[0] and "run_dir" not in lines[0] and "logger" not in lines[0]
    assert "anonymous" not in text
    assert "# saelab run: wb\n\n## Metrics\n| metric | value |" in p.stdout


def test_learning_rates_are_named_as_lightnings_lr_monitor_names_them():
    from collections import defaultdict

    from pytorch_lightning.callbacks import LearningRateMonitor

    from saelab.lit import learning_rates

    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    one = torch.optim.Adam([a], lr=0.5)
    groups = torch.optim.SGD(
        [{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2, "name": "enc"}, {"params": [c]}], lr=0.3
    )
    assert learning_rates(one) == {"lr-Adam": 0.5}
    assert learning_rates(groups) == {"lr-SGD/pg1": 0.1, "lr-SGD/enc": 0.2, "lr-SGD/pg3": 0.3}
    for opt in (one, groups):  # the callback's own names for the same optimiser
        names, _ = LearningRateMonitor()._find_names_from_optimizers([opt], [], defaultdict(int))
        assert list(learning_rates(opt)) == names[0]
