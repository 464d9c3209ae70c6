"""Where the three axes meet: build data, SAE and objective from config, fit, evaluate, export.

Everything is constructed with `hydra.utils.instantiate`; library classes receive plain arguments.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import RichProgressBar

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


class StepProgressBar(RichProgressBar):
    """One bar per fit that counts optimiser steps: `<stage> step i/max_steps`.

    Lightning's own bar counts the batches of an epoch: with `max_steps` and no `max_epochs` it reads
    "Epoch 0/-2", and it starts again at every epoch of a finite source. Validation gets no bar of its own
    (it is a few batches between steps), and the W&B run id (`v_num`) is left out of the metrics.
    """

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def configure_columns(self, trainer: pl.Trainer) -> list:
        description, bar, count, *rest = super().configure_columns(trainer)
        return [description, count, bar, *rest]  # "train step 20/20 ━━━━ 0:00:01 ..."

    def _initialize_train_progress_bar_id(self) -> None:
        t = self.trainer
        total = t.max_steps if t.max_steps > 0 else t.estimated_stepping_batches  # max_epochs fits (hosts)
        self.train_progress_bar_id = self._add_task(total, f"{self.stage} step")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.progress is not None and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def progress_bar(stage: str, enabled: bool = True) -> list[pl.Callback]:
    """The callbacks list entry for a fit's bar: [StepProgressBar], or [] when the trainer config turns
    the bar off (`enable_progress_bar: false`; Lightning refuses a bar callback then)."""
    return [StepProgressBar(stage)] if enabled else []


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


# override keys left out of run names: where and how a run is logged, or what `name` already says
_NOT_IN_RUN_NAME = {"experiment", "sweeps", "name", "run_dir", "resume", "logger", "paths", "hydra"}


def run_name(cfg: DictConfig, stage: str) -> str:
    """`<name>/<stage>` and the job's command-line overrides, so the jobs of a sweep are told apart
    (`train/train sae.activation.k=4`). Overrides of where and how a run is logged are left out; not
    under @hydra.main (tests, recipes called from Python) there are none."""
    from hydra.core.hydra_config import HydraConfig

    try:
        task = list(HydraConfig.get().overrides.task)
    except ValueError:
        task = []
    kept = [o.lstrip("+") for o in task if re.split(r"[./=]", o.lstrip("+~"))[0] not in _NOT_IN_RUN_NAME]
    return " ".join([f"{cfg.name}/{stage}", *kept])


def make_logger(cfg: DictConfig, run_dir: Path, stage: str, start: bool = True):
    """The logger of one stage's run (None for logger=none), named by `run_name`. With `start` the run
    begins now (`start_run`); `fit` starts it once its Trainer exists, which is what tells the processes of
    a multi-node DDP job which one is rank 0."""
    if not cfg.get("logger"):
        return None
    target = cfg.logger.get("_target_", "")
    name = f"csv/{stage}" if "CSV" in target else run_name(cfg, stage)
    # _convert_: nested nodes (W&B `settings`) reach the logger as plain dicts
    logger = instantiate(cfg.logger, save_dir=str(run_dir), name=name, _convert_="all")
    if type(logger).__name__ == "WandbLogger":
        # Lightning passes wandb.init `anonymous=None`, which wandb answers with a deprecation warning
        logger._wandb_init.pop("anonymous", None)
    if start:
        start_run(logger, cfg)
    return logger


def start_run(logger, cfg: DictConfig) -> None:
    """Begin the run with the resolved config (every stage's run carries it, not only training runs). A W&B
    run whose settings keep W&B silent (conf/logger/wandb_*.yaml) is announced in one line;
    `logger.settings.silent=false` brings back W&B's own block instead."""
    if logger is None:
        return
    logger.log_hyperparams(plain(cfg))
    _announce(logger)


def _announce(logger) -> None:
    """One line for a new silent W&B run: its name and where it is (on rank 0, where the run lives)."""
    if type(logger).__name__ != "WandbLogger":
        return
    import wandb

    run = wandb.run
    if run is None or not run.settings.silent:
        return
    where = f"{run.settings.sync_dir} (offline; `wandb sync` uploads it)" if run.offline else run.url
    print(f"wandb: {run.name} → {where}", flush=True)


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
        *progress_bar(stage, cfg.trainer.get("enable_progress_bar", True)),
    ]
    logger = make_logger(cfg, run_dir, stage, start=False)
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(run_dir),
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    start_run(logger, cfg)
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
