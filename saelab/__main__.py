"""`saelab [overrides]` (or `python -m saelab`): compose the config with Hydra and run its recipe."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from saelab.allocator import keep_freed_memory
from saelab.checks import check_config
from saelab.lit import end_distributed
from saelab.sweep import JobFailed, is_wandb_sweep
from saelab.train import apply_debug, run_dir_of

PKG = Path(__file__).resolve().parent
log = logging.getLogger("saelab")


def shipped(name: str) -> Path:
    """`conf/` or `sweeps/`: inside the package in an installed wheel (setup.py copies them there), at the
    repository top in a checkout."""
    inside = PKG / name
    return inside if inside.is_dir() else PKG.parent / name


CONF = shipped("conf")
SWEEPS = shipped("sweeps")


def register_sweeps(folder: Path = SWEEPS) -> None:
    """Make each `sweeps/NAME.yaml` an option of the `sweeps` group, used as `+sweeps=NAME`.

    The folder sits beside conf/, not in it. Putting its parent on Hydra's search path would also make
    every sibling folder (.git, .venv, outputs) a group; the ConfigStore holds just these files and is on
    the search path of runs, `--help` and shell completion alike. Sweep files are `# @package _global_`.
    A W&B sweep spec kept beside them (`wandb sweep sweeps/wandb_topk.yaml`) is not a Hydra config and is
    left out.
    """
    store = ConfigStore.instance()
    for path in sorted(folder.glob("*.yaml")):
        node = OmegaConf.load(path)
        if not is_wandb_sweep(node):
            store.store(name=path.stem, node=node, group="sweeps", package="_global_")


def friendly_error(exc: BaseException) -> str:
    """The innermost cause of an exception, as one line a user can act on."""
    while (nxt := exc.__cause__ or exc.__context__) is not None:
        if type(exc).__name__ != "InstantiationException" and not str(exc).startswith(
            "Error in call to target"
        ):
            break
        exc = nxt
    return f"{type(exc).__name__}: {exc}"


def log_to_file(level: int, msg: str, exc_info: bool = False) -> None:
    """Record `msg` in the run's log file (Hydra's job logging writes `<run dir>/__main__.log`) but not on
    the terminal, where the same line has just been printed to stderr."""
    if not log.isEnabledFor(level):
        return
    record = log.makeRecord(log.name, level, __file__, 0, msg, (), sys.exc_info() if exc_info else None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and level >= handler.level:
            handler.handle(record)


def in_multirun() -> bool:
    """Whether this run is a job of a multirun (`-m`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_recipe(cfg: DictConfig):
    name = cfg.recipe.name
    try:
        module = importlib.import_module(f"saelab.recipes.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"saelab.recipes.{name}":
            raise
        available = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(available)}") from e
    cfg = apply_debug(cfg)
    check_config(cfg)  # a bad value stops here, with its key, before anything is built
    return module.run(cfg)


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def main(cfg: DictConfig):
    keep_freed_memory()
    try:
        results = run_recipe(cfg)
    except KeyboardInterrupt as e:  # a fit saves a checkpoint first and names it (CheckpointOnInterrupt)
        saved = f"; {e}" if str(e) else ""
        # a run given +run_dir= is found again by that override; otherwise name Hydra's run dir
        where = "" if cfg.get("run_dir") else f" hydra.run.dir={run_dir_of(cfg)}"
        msg = f"saelab: interrupted{saved}. Continue with the same overrides plus `resume=auto{where}`."
        print(msg, file=sys.stderr)
        log_to_file(logging.WARNING, msg)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - one clear line instead of a traceback
        log_to_file(logging.ERROR, f"saelab: error: {friendly_error(e)}")
        log_to_file(logging.DEBUG, "traceback:", exc_info=True)  # with hydra.verbose=saelab
        if os.environ.get("SAELAB_DEBUG"):
            raise
        print(f"saelab: error: {friendly_error(e)}\n(set SAELAB_DEBUG=1 for the traceback)", file=sys.stderr)
        if in_multirun():  # the job fails, not the process: the launcher runs the other jobs
            raise JobFailed(friendly_error(e)) from None
        sys.exit(2)
    finally:
        end_distributed()  # under DDP every rank leaves its process group before exit
    metric = cfg.get("optimized_metric")
    if metric and isinstance(results, dict):
        value = results.get("metrics", {}).get(metric)
        return float(value) if value is not None else None
    return None


def cli() -> None:
    """The `saelab` console script."""
    register_sweeps()
    main()


if __name__ == "__main__":
    cli()
