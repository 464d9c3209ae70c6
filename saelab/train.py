"""Where the three axes meet: build data, SAE and objective from config, fit, evaluate, export.

Everything is constructed with `hydra.utils.instantiate`; library classes receive plain arguments.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from saelab.checkpoint import AtomicCheckpointIO, ConfigInCheckpoint
from saelab.lit import LitSAE
from saelab.objectives import Objective


class _DropAdvertisement(logging.Filter):
    """Lightning's logger-connector prints a product tip on every `Trainer`; a multi-stage recipe shows it
    once per fit. Its other info lines (devices, stop reason) pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage().lower()


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropAdvertisement())
# Lightning's own pytree helper trips a torch deprecation on every fit; nothing a user can act on.
# Set here, not in __main__, because joblib sweep workers and DDP processes import this module too.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


@dataclass
class FitResult:
    lit: LitSAE
    datamodule: pl.LightningDataModule
    trainer: pl.Trainer
    logger: object | None
    seconds: float

    @property
    def sae(self):
        return self.lit.sae


def run_dir_of(cfg: DictConfig) -> Path:
    """The run directory: `run_dir` when set (tests, recipes), else Hydra's output dir."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under @hydra.main
        return Path(cfg.paths.output_dir) / cfg.name / time.strftime("%Y-%m-%d_%H-%M-%S")


def apply_debug(cfg: DictConfig) -> DictConfig:
    """Apply `debug` (from +debug=tiny) and the recipe's own `recipe.debug`: {dotted key: value}, each set
    only where the key exists in this config (so one preset suits every source and recipe)."""
    if not cfg.get("debug"):
        return cfg
    changes: dict = {}
    for node in (cfg.debug, cfg.recipe.get("debug")):
        if node:
            changes.update(plain(node))
    with open_dict(cfg):
        for key, value in changes.items():
            if OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING:
                OmegaConf.update(cfg, key, value, merge=False)
    return cfg


_MISSING = object()


def plain(node: DictConfig) -> dict[str, Any]:
    """A config mapping as a resolved plain dict (for checkpoints, logs and non-Hydra constructors)."""
    out = OmegaConf.to_container(node, resolve=True)
    if not isinstance(out, dict):
        raise TypeError(f"expected a config mapping, got {type(out).__name__}")
    return {str(k): v for k, v in out.items()}


def build_objective(terms_cfg: DictConfig) -> Objective:
    terms = instantiate(terms_cfg) if terms_cfg is not None else {}
    return Objective(dict(terms or {}))


def build_lit(cfg: DictConfig, sae) -> LitSAE:
    optim = cfg.optim
    return LitSAE(
        sae=sae,
        objective=build_objective(cfg.objective.terms),
        optimizer=instantiate(optim.optimizer),
        scheduler=instantiate(optim.scheduler) if optim.get("scheduler") else None,
        dead_window_tokens=cfg.lit.dead_window_tokens,
        seed=cfg.seed,
        log_every=cfg.lit.log_every,
    )


def make_logger(cfg: DictConfig, run_dir: Path, stage: str):
    if not cfg.get("logger"):
        return None
    target = cfg.logger.get("_target_", "")
    kwargs = {"save_dir": str(run_dir), "name": f"csv/{stage}" if "CSV" in target else f"{cfg.name}/{stage}"}
    return instantiate(cfg.logger, **kwargs)


def resolve_resume(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    if not cfg.get("resume"):
        return None
    if cfg.resume == "auto":
        last = ckpt_dir / "last.ckpt"
        return str(last) if last.exists() else None
    path = Path(cfg.resume)
    if not path.exists():
        raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint. Use a .ckpt path or resume=auto.")
    return str(path)


def fit(cfg: DictConfig, run_dir: Path, stage: str = "train", datamodule=None, sae=None) -> FitResult:
    """Build (unless given) and train one SAE; checkpoints go to <run_dir>/checkpoints/<stage>/."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = datamodule if datamodule is not None else instantiate(cfg.data)
    if getattr(dm, "d_in", None) is None:
        raise ValueError("the data source declares no d_in: set data.d_in to the activation width.")
    sae = sae if sae is not None else instantiate(cfg.sae)
    lit = build_lit(cfg, sae)
    ckpt_dir = run_dir / "checkpoints" / stage
    callbacks = [
        pl.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir, save_last=True, save_top_k=1, every_n_train_steps=cfg.checkpoint.every_n_steps
        ),
        ConfigInCheckpoint(plain(cfg)),
    ]
    logger = make_logger(cfg, run_dir, stage)
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(run_dir),
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    if logger is not None and hasattr(logger, "log_hyperparams"):
        logger.log_hyperparams(plain(cfg))
    t0 = time.perf_counter()
    trainer.fit(lit, datamodule=dm, ckpt_path=resolve_resume(cfg, ckpt_dir))
    return FitResult(lit, dm, trainer, logger, time.perf_counter() - t0)


@contextlib.contextmanager
def wandb_scope(logger):
    """Ends a W&B run whatever happens (so multirun jobs never share one); a no-op for other loggers."""
    try:
        yield logger
    finally:
        if logger is not None and type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()


def log_summary(logger, metrics: dict) -> None:
    """Write final metrics to the W&B run summary (or the logger's metrics for others)."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if logger is None:
        return
    if type(logger).__name__ == "WandbLogger":
        logger.experiment.summary.update(flat)
    else:
        logger.log_metrics(flat)
        logger.save()
