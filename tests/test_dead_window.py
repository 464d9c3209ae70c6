"""One dead-latent window, sized to the run: AuxK fires in every recipe, and every report counts dead
latents the way training does."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import CONF, compose_cfg
from support import synthetic_small

from saelab.resolvers import DEAD_WINDOW_CAP, dead_window
from saelab.train import fit


def test_window_is_a_tenth_of_the_run_between_one_batch_and_ten_million_tokens():
    assert dead_window(1200, 512) == 61_440
    assert dead_window(3, 512) == 512  # never shorter than one batch
    assert dead_window(10**9, 4096) == DEAD_WINDOW_CAP == 10_000_000
    assert dead_window(-1, 512) == DEAD_WINDOW_CAP  # until stopped: the cap
    with pytest.raises(ValueError, match="data.batch_size"):
        dead_window(100, 0)


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_can_see_a_latent_die(name):
    """Each experiment's window is shorter than its SAE's training run, so AuxK has dead latents to
    revive (with the old fixed 1M tokens, ssae_physics, protein_esm2 and topk_synthetic never had)."""
    cfg = compose_cfg([f"+experiment={name}"])
    tokens = cfg.trainer.max_steps * cfg.data.batch_size
    window = cfg.lit.dead_window_tokens
    assert isinstance(window, int) and 0 < window < tokens, (window, tokens)
    core = cfg.eval.metrics.get("core")
    if core is not None:  # the evaluator counts dead latents over the same window
        assert core.dead_window_tokens == window


def test_auxk_fires_in_a_run_of_default_settings(tmp_path):
    cfg = compose_cfg(
        [
            *synthetic_small(batch_size=128, d_sae=256),  # 256 latents for 128 features: some die
            "objective/terms=[mse,auxk]",
            "trainer.max_steps=300",
            "lit.log_every=5",
            "logger=csv",
            "+trainer.enable_progress_bar=false",
        ]
    )
    assert cfg.lit.dead_window_tokens == 3840  # 300 steps × 128 rows / 10
    fit(cfg, Path(tmp_path))
    rows = list(csv.DictReader(next(Path(tmp_path).rglob("metrics.csv")).open()))
    auxk = [float(r["loss/auxk"]) for r in rows if r.get("loss/auxk")]
    dead = [float(r["sparsity/dead_frac"]) for r in rows if r.get("sparsity/dead_frac")]
    assert max(dead) > 0 and max(auxk) > 0, (max(dead), max(auxk))
