"""Several SAEs in one fit (saelab.multi, saelab.recipes.multi): each ends bit-identical to its own fit,
resumes, logs under its name, refuses settings it cannot share; the recipe exports and reports every SAE."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import compose_cfg
from support import run_cli

from saelab.checks import ConfigError
from saelab.io import load_sae
from saelab.recipes.multi import check_members, fit_many, member_cfgs
from saelab.train import fit

# synthetic_small without its k: the ReLU member has no sae.activation.k to set
SMALL = [
    "data.d_in=32",
    "data.n_features=128",
    "data.mean_active=4",
    "data.batch_size=32",
    "sae.d_sae=64",
    "trainer.max_steps=30",
    "trainer.val_check_interval=10",
    "trainer.limit_val_batches=1",
    "logger=none",
    "+trainer.enable_progress_bar=false",
]
# TopK k=4; TopK k=8, wider, at another learning rate; BatchTopK with AuxK; ReLU with L1
SAES = {
    "k4": ["sae.activation.k=4"],
    "k8": ["sae.activation.k=8", "sae.d_sae=96", "optim.optimizer.lr=0.001"],
    "batchtopk": ["sae=batchtopk", "sae.activation.k=4", "lit.dead_window_tokens=256"],
    "relu": ["sae=relu", "objective/terms=[mse,l1]"],
}


def configs(saes: dict[str, list[str]], *shared: str):
    """The base config and {name: the base with the SAE's overrides} (as the recipe composes them)."""
    return compose_cfg([*SMALL, *shared]), {n: compose_cfg([*SMALL, *shared, *o]) for n, o in saes.items()}


def weights(sae) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def test_each_sae_of_a_multi_fit_equals_its_own_fit(tmp_path):
    """Same batches, seed and settings: bit-identical weights, buffers included. Gradients are clipped
    hard, so a norm taken over all SAEs instead of each one's would show."""
    base, members = configs(SAES, "trainer.gradient_clip_val=0.05")
    multi = fit_many(base, members, tmp_path / "multi")
    assert multi.trainer.global_step == 30  # a step is a batch, not one per SAE optimiser
    for name, c in members.items():
        alone = weights(fit(c, tmp_path / name).lit.sae)
        together = weights(multi.saes[name])
        assert together.keys() == alone.keys()
        for key, ref in alone.items():
            assert torch.equal(together[key], ref), f"{name}: {key} differs from the SAE's own fit"


def test_a_multi_fit_stopped_halfway_resumes_to_identical_weights(tmp_path):
    saes = {n: SAES[n] for n in ("k4", "relu")}
    # the schedule and the dead window are pinned to the full run, so only the step budget differs
    pinned = ["optim.scheduler.total_steps=30", "lit.dead_window_tokens=256", "checkpoint.every_n_steps=5"]
    full = fit_many(*configs(saes, *pinned), tmp_path / "full")
    fit_many(*configs(saes, *pinned, "trainer.max_steps=15"), tmp_path / "halves")
    ckpt = torch.load(tmp_path / "halves/checkpoints/multi/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 15
    assert {"members.k4.sae.W_dec", "members.relu.sae.W_dec", "members.k4.tokens_since_fired"} <= set(
        ckpt["state_dict"]
    )
    assert set(ckpt["optimizer_states"][0]) == set(ckpt["saelab_multi_schedulers"]) == {"k4", "relu"}
    resumed = fit_many(*configs(saes, *pinned, "resume=auto"), tmp_path / "halves")
    assert resumed.trainer.global_step == 30
    for name in saes:
        ref, got = weights(full.saes[name]), weights(resumed.saes[name])
        for key in ref:
            assert torch.equal(got[key], ref[key]), f"{name}: {key} differs after resuming at step 15"

    # an SAE whose settings changed is not continued from these checkpoints
    changed = {"k4": ["sae.activation.k=5"], "relu": saes["relu"]}
    with pytest.raises(ValueError, match=r"other SAE settings \(k4: sae\.activation\.k: 4 → 5\)"):
        fit_many(*configs(changed, *pinned, "resume=auto"), tmp_path / "halves")


def test_metrics_are_logged_under_each_sae_name(tmp_path):
    saes = {n: SAES[n] for n in ("k4", "relu")}
    fit_many(*configs(saes, "logger=csv", "trainer.max_steps=10", "lit.log_every=5"), tmp_path)
    with open(tmp_path / "csv/multi/version_0/metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    for name in saes:
        for key in ("loss/total", "loss/mse", "metrics/explained_variance", "metrics/l0", "lr"):
            assert f"{name}/{key}" in columns, (name, key, sorted(columns))
        assert f"{name}/val/explained_variance" in columns
    assert "relu/loss/l1" in columns and "k4/loss/auxk" in columns
    assert "loss/total" not in columns  # nothing unnamed


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.batch_size=64"], r"SAE 'odd': data\.batch_size is 64 here but 32 in the base config"),
        (["trainer.max_steps=40"], r"trainer\.max_steps is 40 here but 30.*in a fit of its own"),
        (["seed=1", "data.seed=0"], r"SAE 'odd': seed is 1 here but 0.*sae\.seed varies"),
        (["eval/metrics=[core]"], r"eval\.metrics\.geometry\._target_ is unset.*takes eval from"),
    ],
)
def test_settings_an_sae_cannot_share_are_refused_with_their_key(tmp_path, overrides, message):
    base, members = configs({"k4": SAES["k4"], "odd": ["sae.activation.k=8", *overrides]})
    with pytest.raises(ConfigError, match=message):
        fit_many(base, members, tmp_path)
    assert not tmp_path.joinpath("checkpoints").exists()  # refused before anything was built


def test_an_sae_name_must_be_a_plain_folder_name_and_the_recipe_needs_saes():
    base, members = configs({"checkpoints": SAES["k4"]})
    with pytest.raises(ConfigError, match="SAE name 'checkpoints'"):
        check_members(base, members)
    with pytest.raises(ConfigError, match=r"recipe\.saes is empty: name each SAE"):
        member_cfgs(compose_cfg(["recipe=multi"]))


@pytest.mark.slow  # through `python -m saelab`
def test_the_topk_k_sweep_as_one_fit_exports_and_reports_every_sae(tmp_path):
    run_cli("+sweeps=topk_k_one_fit", "+debug=tiny", run_dir=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["saes"]) == {"k4", "k8", "k16"}
    for name, k in (("k4", 4), ("k8", 8), ("k16", 16)):
        row = results["saes"][name]
        assert 0 < row["l0"] <= k and "explained_variance" in row, row
        assert results["metrics"][f"{name}/train/steps"] == 20
        sae = load_sae(tmp_path / name / "sae")
        assert sae.d_sae == 128 and sae.activation.k == k
    ckpt = torch.load(tmp_path / "checkpoints/multi/last.ckpt", weights_only=True)
    assert set(ckpt["saelab_multi_configs"]) == {"k4", "k8", "k16"}
    assert (tmp_path / "report.md").exists()
