"""The `shift` recipe (bias_in_bios_shift): its config, a bad profession stopping with the counts, and a run end
to end at `+debug=tiny` through the CLI on the embedded host and the offline biographies."""

from __future__ import annotations

import json

import pytest
from support import run_cli


def test_experiment_composes(cfg_factory):
    cfg = cfg_factory(["+experiment=bias_in_bios_shift"])
    rc = cfg.recipe
    assert rc.name == "shift" and rc.source == "offline"
    assert list(rc.professions) == ["musician", "actor"] and list(rc.genders) == ["male", "female"]
    assert list(rc.scr_n) == [2, 5, 10, 20, 50] and rc.n_latents == 20
    assert cfg.data._target_ == "saelab.data.text.TextActivations" and cfg.sae.d_sae == 2048


@pytest.mark.slow
def test_unknown_profession_stops_with_the_counts(tmp_path):
    p = run_cli(
        "+experiment=bias_in_bios_shift", "+debug=tiny", "logger=none", "recipe.professions=[surgeon,actor]",
        run_dir=tmp_path, check=False,
    )  # fmt: skip
    assert p.returncode == 2
    assert "profession 'surgeon' is not in" in p.stderr and "actor" in p.stderr


@pytest.mark.slow
def test_shift_recipe_tiny(tmp_path):
    run_cli("+experiment=bias_in_bios_shift", "+debug=tiny", "logger=none", run_dir=tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    rows = res["rows"]
    expected = {"Original", "GSAE SHIFT", "GSAE SHIFT+retrain", "SSAE SHIFT", "SSAE SHIFT+retrain"}
    assert expected | {"Neurons SHIFT", "Neurons SHIFT+retrain", "Oracle"} == set(rows)
    for r in rows.values():
        assert 0 <= r["worst_group"] <= r["profession_acc"] + 1e-9 <= 1 + 1e-9
    assert (tmp_path / "groups.png").exists() and (tmp_path / "scr.png").exists()
    assert "Selected latents" in (tmp_path / "report.md").read_text()
