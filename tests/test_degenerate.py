"""Runs that cannot train, or train to nothing, say so: `trainer.max_steps=-1` with a decaying schedule is
refused; a diverged run and a sparsity-free objective on a dense activation warn (or stop, by
`lit.on_degenerate=stop`), and a healthy run stays quiet."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate
from support import run_cli

from saelab.health import DegenerateRunError, divergence, recorded
from saelab.recipes import train as train_recipe
from saelab.schedule import warmup_decay
from saelab.train import apply_debug, build_lit, fit


def tiny(overrides: list[str]):
    """The default config at `+debug=tiny` sizes (20 steps, validation every 10, batch 64, d_sae 128)."""
    return apply_debug(compose_cfg(["+debug=tiny", *overrides]))


# ---------------------------------------------------------------------- trainer.max_steps=-1
@pytest.mark.parametrize("total_steps", [-1, 0])
def test_warmup_decay_refuses_a_decay_without_a_length(total_steps):
    """Placed at step 0, the decay held the rate at 0 from the end of warm-up on (lr 0 from step 20)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match=r"trainer\.max_steps.*decay_fraction=0"):
        warmup_decay(opt, warmup_steps=20, decay_fraction=0.2, total_steps=total_steps)


def test_until_stopped_with_the_default_schedule_is_refused_before_training(tmp_path):
    # max_epochs/limit_train_batches only bound the run in case it is not refused
    cfg = tiny(["trainer.max_steps=-1", "+trainer.max_epochs=1", "+trainer.limit_train_batches=30"])
    with pytest.raises(ValueError, match=r"trainer\.max_steps=-1 \(until stopped\): set trainer\.max_steps"):
        fit(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_until_stopped_without_decay_trains_at_the_full_rate_after_warm_up(tmp_path):
    cfg = tiny(
        [
            "trainer.max_steps=-1",
            "optim.scheduler.decay_fraction=0",
            "optim.scheduler.warmup_steps=5",
            "+trainer.max_epochs=1",
            "+trainer.limit_train_batches=12",
        ]
    )
    res = fit(cfg, tmp_path)
    assert res.trainer.global_step == 12
    assert res.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(cfg.optim.optimizer.lr)


# ---------------------------------------------------------------------- divergence
def test_divergence_thresholds():
    assert "nan" in str(divergence(float("nan"), 0.0))
    assert divergence(-4.5e12, 1.0) == (
        "explained variance -4.5e+12 (worse than predicting the mean), no latent fires (every latent dead)"
    )
    assert divergence(0.0, 1.0) == "no latent fires (every latent dead)"
    assert divergence(-0.5, 0.9) is None  # poor, not diverged


def test_diverged_run_warns_and_records_it_in_results(tmp_path, capsys):
    results = train_recipe.run(tiny(["optim.optimizer.lr=1e6", f"+run_dir={tmp_path}"]))
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("saelab: WARNING: the run diverged"))
    assert "optim.optimizer.lr (now 1e+06)" in line and "lit.on_degenerate=stop" in line, line
    assert len(results["warnings"]) == 1 and results["warnings"][0].startswith("train: the run diverged")
    assert json.loads((tmp_path / "results.json").read_text())["warnings"] == results["warnings"]
    assert "## Warnings" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "sae" / "cfg.json").exists()  # under warn the run still finishes and exports


def test_diverged_run_stops_at_the_first_validation_under_stop(tmp_path):
    cfg = tiny(
        ["optim.optimizer.lr=1e6", "lit.on_degenerate=stop", "trainer.max_steps=40", f"+run_dir={tmp_path}"]
    )
    with pytest.raises(DegenerateRunError, match="the run diverged: .* at the validation of step 10"):
        train_recipe.run(cfg)
    assert not (tmp_path / "sae").exists() and not (tmp_path / "results.json").exists()


def test_diverged_run_stops_after_the_fit_when_no_validation_saw_it(tmp_path):
    cfg = tiny(["optim.optimizer.lr=1e6", "lit.on_degenerate=stop", "trainer.val_check_interval=1000"])
    with pytest.raises(DegenerateRunError, match=r"after the fit \(step 20"):
        fit(cfg, tmp_path)


@pytest.mark.slow
def test_diverged_run_under_stop_exits_with_one_line_and_no_export(tmp_path):
    p = run_cli(
        "+debug=tiny", "optim.optimizer.lr=1e6", "lit.on_degenerate=stop", run_dir=tmp_path, check=False
    )
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("saelab: error:")]
    assert len(errors) == 1 and "DegenerateRunError: the run diverged" in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr and not (tmp_path / "sae").exists()


# ---------------------------------------------------------------------- sparsity-free objectives
@pytest.mark.parametrize(
    ("sae", "terms", "fix"), [("jumprelu", "[mse]", "[mse,l0]"), ("relu", "[mse]", "[mse,l1]")]
)
def test_sparsity_free_objective_on_a_dense_activation_warns(tmp_path, capsys, sae, terms, fix):
    res = fit(tiny([f"sae={sae}", f"objective/terms={terms}", "trainer.max_steps=2"]), tmp_path)
    err = capsys.readouterr().err
    assert "saelab: WARNING: the objective (mse) has no sparsity term" in err, err
    assert f"objective/terms={fix}" in err and "lit.on_degenerate=stop" in err
    assert res.lit.health_warnings and res.lit.health_warnings[0].startswith("the objective (mse)")


def test_sparsity_free_objective_stops_before_training_under_stop(tmp_path):
    cfg = tiny(["sae=jumprelu", "objective/terms=[mse]", "lit.on_degenerate=stop"])
    with pytest.raises(DegenerateRunError, match=r"add one \(objective/terms=\[mse,l0\]\)"):
        fit(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # refused before the first step


def test_unknown_on_degenerate_is_refused():
    cfg = tiny(["lit.on_degenerate=ignore"])
    with pytest.raises(ValueError, match="lit.on_degenerate must be one of warn, stop"):
        build_lit(cfg, instantiate(cfg.sae))


# ---------------------------------------------------------------------- healthy runs stay quiet
def test_a_healthy_tiny_run_does_not_warn(tmp_path, capsys):
    results = train_recipe.run(tiny([f"+run_dir={tmp_path}"]))
    assert "WARNING" not in capsys.readouterr().err
    assert "warnings" not in results and "Warnings" not in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "overrides",
    [
        ["sae=relu", "objective/terms=[mse,l1]"],
        ["sae=jumprelu", "objective/terms=[mse,l0]"],
        ["sae=batchtopk", "objective/terms=[mse,auxk]"],
        ["sae=topk", "objective/terms=[mse]"],  # sparse by construction: no sparsity term needed
    ],
)
def test_healthy_variants_do_not_warn(tmp_path, capsys, overrides):
    fit(tiny(overrides), tmp_path)
    assert "WARNING" not in capsys.readouterr().err and recorded(tmp_path) == []
