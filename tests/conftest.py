"""Shared fixtures: config composition against the real conf/ tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from saelab.__main__ import register_sweeps

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SAELAB_ROOT", str(ROOT))
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def compose_cfg(overrides: list[str] | None = None):
    """Compose conf/config.yaml with overrides (the `sweeps` group registered, as the CLI has it)."""
    register_sweeps()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


@pytest.fixture
def cfg_factory():
    return compose_cfg
