"""Every config composes, resolves, and binds to its constructor; the sae × data × term grid composes."""

from __future__ import annotations

import inspect
import itertools
from pathlib import Path

import pytest
from conftest import CONF, ROOT, compose_cfg
from hydra.utils import get_object
from omegaconf import OmegaConf

from saelab.sweep import is_wandb_sweep

SAES = sorted(p.stem for p in (CONF / "sae").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
TERMS = sorted(p.stem for p in (CONF / "objective" / "terms").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# Hydra sweep files (the W&B sweep spec beside them is not a Hydra config: tests/test_sweeps.py)
SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml") if not is_wandb_sweep(OmegaConf.load(p)))
METRICS = sorted(p.stem for p in (CONF / "eval" / "metrics").glob("*.yaml"))
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))


def bind_targets(node, where: str = "cfg") -> int:
    """Bind every `_target_` node's keys to its callable's signature; returns how many were checked."""
    n = 0
    if OmegaConf.is_dict(node):
        if "_target_" in node:
            fn = get_object(node._target_)
            kwargs = {k: v for k, v in node.items() if not str(k).startswith("_")}
            sig = inspect.signature(fn)
            try:
                (sig.bind_partial if node.get("_partial_", False) else sig.bind)(**kwargs)
            except TypeError as e:
                raise AssertionError(f"{where}: {node._target_} does not accept {sorted(kwargs)}: {e}") from e
            n += 1
        for k, v in node.items():
            n += bind_targets(v, f"{where}.{k}")
    elif OmegaConf.is_list(node):
        for i, v in enumerate(node):
            n += bind_targets(v, f"{where}[{i}]")
    return n


def check(cfg) -> int:
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # every interpolation resolves
    # the Trainer node also gets run-time kwargs (callbacks, logger, ...) from train.fit
    cfg.trainer.callbacks, cfg.trainer.logger, cfg.trainer.plugins = [], False, []
    cfg.trainer.default_root_dir = "."
    if cfg.get("logger"):  # train.make_logger adds the run dir and run name
        cfg.logger.save_dir, cfg.logger.name = ".", "stage"
    return bind_targets(cfg)


def test_groups_are_populated():
    assert {"relu", "topk", "batchtopk", "jumprelu", "residual"} <= set(SAES)
    assert {"mse", "fvu", "tilted", "l1", "l0", "auxk", "ortho", "matryoshka"} <= set(TERMS)
    assert "synthetic" in DATA


@pytest.mark.parametrize("sae,data", list(itertools.product(SAES, DATA)))
def test_sae_data_grid_with_every_term(sae: str, data: str):
    cfg = compose_cfg([f"sae={sae}", f"data={data}", f"objective/terms=[{','.join(TERMS)}]"])
    assert set(cfg.objective.terms) == set(TERMS)
    assert check(cfg) >= 2 + len(TERMS)


@pytest.mark.parametrize("term", TERMS)
def test_each_term_alone(term: str):
    cfg = compose_cfg([f"objective/terms=[{term}]"])
    assert list(cfg.objective.terms) == [term]
    check(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose_and_bind(experiment: str):
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_"), "experiments are global deltas"
    assert "python -m saelab" in text, "experiments state their command"
    cfg = compose_cfg([f"+experiment={experiment}"])
    assert cfg.name == experiment
    check(cfg)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweeps_set_only_sweeper_params(sweep: str):
    raw = OmegaConf.load(ROOT / "sweeps" / f"{sweep}.yaml")
    defaults = [str(k).split()[-1] for entry in raw.get("defaults", []) for k in entry]
    if defaults == ["/recipe"]:
        # a sweep as one multi-SAE fit (topk_k_one_fit): the multi recipe and its list of SAEs, nothing else
        assert set(raw.keys()) == {"defaults", "recipe"} and set(raw.recipe.keys()) == {"saes"}
        assert raw.defaults[0]["override /recipe"] == "multi"
    else:
        assert set(raw.keys()) <= {"hydra", "defaults"} and set(raw.hydra.keys()) == {"sweeper"}
        # a defaults list may only choose the sweeper (optuna_topk: `override /hydra/sweeper: optuna`)
        assert all(d.startswith("/hydra/sweeper") for d in defaults), defaults
    cfg = compose_cfg([f"+sweeps={sweep}"])
    check(cfg)


@pytest.mark.parametrize("group", ["trainer", "logger", "optim", "paths"])
def test_every_option_of_other_groups(group: str):
    for opt in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        check(compose_cfg([f"{group}={opt}"]))


def test_every_recipe_module_exists_and_has_run():
    """Each conf/recipe option names a module with run(cfg); recipes resolve inside their experiments."""
    import importlib

    for name in RECIPES:
        cfg = compose_cfg([f"recipe={name}"])
        assert cfg.recipe.name == name
        assert callable(importlib.import_module(f"saelab.recipes.{name}").run)


@pytest.mark.parametrize("metric", METRICS)
def test_each_evaluator_alone_and_all_together(metric: str):
    cfg = compose_cfg([f"eval/metrics=[{metric}]"])
    assert list(cfg.eval.metrics) == [metric]
    check(cfg)
    assert set(compose_cfg([f"eval/metrics=[{','.join(METRICS)}]"]).eval.metrics) == set(METRICS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_accept_the_debug_preset(experiment: str):
    from saelab.train import apply_debug

    full = compose_cfg([f"+experiment={experiment}"])
    cfg = compose_cfg([f"+experiment={experiment}", "+debug=tiny"])
    check(cfg)
    cfg = apply_debug(cfg)
    assert cfg.trainer.max_steps <= 20 < full.trainer.max_steps
    assert not cfg.get("logger")
    for key in ("train_tokens", "max_sequences", "n_analysis"):  # shrunk where the source has the key
        if key in full.data:  # None means "no limit"
            assert full.data[key] is None or cfg.data[key] < full.data[key], key
            assert cfg.data[key] is not None, key
    for key, value in (cfg.recipe.get("debug") or {}).items():
        assert OmegaConf.select(cfg, key) == value, f"recipe.debug key {key} was not applied"
    check(cfg)


def test_apply_debug_sets_only_existing_keys():
    from saelab.train import apply_debug

    cfg = compose_cfg(["+debug=tiny"])  # synthetic data: no train_tokens, no max_sequences
    apply_debug(cfg)
    assert "train_tokens" not in cfg.data and "max_sequences" not in cfg.data
    assert cfg.data.batch_size == 64 and cfg.sae.d_sae == 128


@pytest.mark.parametrize(
    "experiment", [e for e in EXPERIMENTS if "compare" in (CONF / "experiment" / f"{e}.yaml").read_text()]
)
def test_every_compare_variant_composes(experiment: str):
    cfg = compose_cfg([f"+experiment={experiment}"])
    assert cfg.recipe.name == "compare" and cfg.recipe.variants
    for name, overrides in cfg.recipe.variants.items():
        vcfg = compose_cfg([*cfg.recipe.base_overrides, *overrides])
        assert vcfg.name == cfg.name, name
        check(vcfg)


def test_d_in_is_the_one_cross_axis_interpolation():
    for p in (CONF / "sae").glob("*.yaml"):
        assert "${data.d_in}" in Path(p).read_text()
    cfg = compose_cfg(["data.d_in=37"])
    assert cfg.sae.d_in == 37
