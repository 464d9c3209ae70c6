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

from saelab import dashboards, health, resolvers
from saelab.checkpoint import (
    LAST,
    AtomicCheckpointIO,
    CheckpointOnInterrupt,
    ConfigInCheckpoint,
    config_differences,
    is_rank_zero,
    newest_checkpoint,
    read_checkpoint,
    remove_superseded,
    remove_temporaries,
)
from saelab.lit import LitSAE
from saelab.objectives import Objective


class _DropAdvertisement(logging.Filter):
    """Lightning's logger-connector prints a product tip on every `Trainer`; a multi-stage recipe shows it
    once per fit. Its other info lines (devices, stop reason) pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage().lower()


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropAdvertisement())
resolvers.register()  # ${saelab.dead_window:...} in conf/config.yaml
# Lightning's own pytree helper trips a torch deprecation on every fit; nothing a user can act on.
# Set here, not in __main__, because joblib sweep workers and DDP processes import this module too.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# saelab decides what may be in a stage's checkpoint dir (resolve_resume refuses another run's checkpoints)
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


class StepProgressBar(RichProgressBar):
    """One bar per fit that counts optimiser steps: `<stage> step i/max_steps`.

    Lightning's own bar counts the batches of an epoch: with `max_steps` and no `max_epochs` it reads
    "Epoch 0/-2", and it starts again at every epoch of a finite source. Validation gets no bar of its own
    (it is a few batches between steps), the W&B run id (`v_num`) is left out of the metrics, the module's
    `bar_metrics` (the training loss) are shown, and the bar is redrawn at most every `REDRAW_SECONDS`.
    """

    # a rich redraw costs about a millisecond, as much as a whole step of a small SAE: redraw at most this often
    REDRAW_SECONDS = 0.2

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage
        self._drawn_at = -float("inf")

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
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        now = time.monotonic()
        final = 0 < trainer.max_steps <= trainer.global_step
        if now - self._drawn_at < self.REDRAW_SECONDS and not final:
            return
        self._drawn_at = now
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.train_progress_bar_id is not None:  # the last steps of an epoch may not have been drawn
            self._update(self.train_progress_bar_id, trainer.global_step)
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        # the training loss is not logged through Lightning (saelab.lit.log_scalars): the module holds it
        items.update({k: float(v) for k, v in getattr(pl_module, "bar_metrics", {}).items()})
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
        on_degenerate=cfg.lit.get("on_degenerate", "warn"),
        compile=cfg.lit.get("compile", False),
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
    """The checkpoint this fit continues from, or None to train from step 0; `ckpt_dir` is where it writes.

    `resume=auto` takes the newest complete checkpoint in `ckpt_dir` (last.ckpt, or the step checkpoint a
    kill during the last.ckpt write left newer) and refuses it, naming the keys, when it was written under
    other settings than `cfg` in anything but `checkpoint.RESUMABLE` (the step budget, where and how the
    run is logged). `resume=<path>` is the deliberate choice: a difference is only noted. A fit that would
    write into a `ckpt_dir` holding checkpoints it does not continue refuses to, so nothing is overwritten
    and each stage keeps one last.ckpt.
    """
    resume = cfg.get("resume")
    if resume == "auto":
        found = newest_checkpoint(ckpt_dir)
        if found is None:
            refuse_to_overwrite(ckpt_dir, "move them away")  # e.g. last-v1.ckpt of older saelab versions
            _say(f"resume=auto: no checkpoint in {ckpt_dir} yet; training from step 0.")
            return None
        path, ckpt = found
        stored = ckpt.get("saelab_config")
        if not isinstance(stored, dict):
            raise ValueError(
                f"resume=auto: {path} records no saelab config, so it cannot be checked to be this run's: "
                f"resume={path} continues it as it is, or start this run in a new run dir."
            )
        if differences := config_differences(stored, cfg):
            raise ValueError(
                f"resume=auto: {path} was written by a run with other settings ({_listed(differences)}): "
                "continue it with that run's overrides, or start this run in a new run dir."
            )
        if path.name != LAST:
            _say(
                f"resume=auto: {ckpt_dir / LAST} is missing or older (a write was killed); resuming from "
                f"{path.name} at step {ckpt.get('global_step')}, the newest complete checkpoint."
            )
        if is_rank_zero() and (removed := remove_superseded(ckpt_dir, cfg)):
            _say(f"removed step checkpoints a kill left behind: {', '.join(p.name for p in removed)}.")
        return str(path)
    if not resume:
        refuse_to_overwrite(ckpt_dir)
        return None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint. Use a .ckpt path or resume=auto.")
    stored = read_checkpoint(path).get("saelab_config")
    if isinstance(stored, dict) and (differences := config_differences(stored, cfg)):
        _say(f"resume={path}: its run had other settings ({_listed(differences)}); continuing under these.")
    if path.resolve().parent != ckpt_dir.resolve():
        refuse_to_overwrite(ckpt_dir)
    return str(path)


def refuse_to_overwrite(
    ckpt_dir: Path, remedy: str = "add resume=auto to continue the run that wrote them"
) -> None:
    held = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if held:
        raise FileExistsError(
            f"{ckpt_dir} already holds checkpoints ({_listed(held, 3)}) that this run would overwrite: "
            f"{remedy}, or start this run in a new run dir."
        )


def _listed(items: list[str], most: int = 6) -> str:
    more = f"; {len(items) - most} more" if len(items) > most else ""
    return "; ".join(items[:most]) + more


def _say(msg: str) -> None:
    if is_rank_zero():
        print(f"saelab: {msg}", flush=True)


def _remove_leftovers(run_dir: Path, stage: str, ckpt_dir: Path) -> None:
    """Remove what a run killed mid-write left: checkpoint temporaries, and export temporaries where the
    recipes export (<run>/sae, <run>/<stage>/sae)."""
    if is_rank_zero() and (removed := remove_temporaries(ckpt_dir, run_dir, run_dir / stage)):
        names = ", ".join(str(p.relative_to(run_dir)) for p in removed)
        _say(f"removed the temporary files a killed run left: {names}.")


def build_source(cfg: DictConfig, datamodule=None):
    """The fit's activation source: `datamodule`, or one built from `cfg.data`; it must declare d_in."""
    dm = datamodule if datamodule is not None else instantiate(cfg.data)
    if getattr(dm, "d_in", None) is None:
        raise ValueError("the data source declares no d_in: set data.d_in to the activation width.")
    return dm


def run_trainer(
    cfg: DictConfig,
    run_dir: Path,
    stage: str,
    lit: pl.LightningModule,
    dm,
    ckpt_path: str | None,
    extra_callbacks: tuple[pl.Callback, ...] = (),
    dashboards_on: bool = True,
) -> tuple[pl.Trainer, Any, float]:
    """Build the stage's Trainer (checkpoints in <run_dir>/checkpoints/<stage>/, the config and
    `extra_callbacks` in them, a checkpoint on Ctrl-C, the step bar, the logger and, with
    `dashboards_on`, the dashboards' callbacks), fit `lit` on `dm` from `ckpt_path`, and remove a step
    checkpoint the fit superseded. Returns (trainer, logger, seconds of `Trainer.fit`)."""
    ckpt_dir = run_dir / "checkpoints" / stage
    on_interrupt = CheckpointOnInterrupt(ckpt_dir / LAST, f"checkpoints/{stage}/{LAST}")
    callbacks = [
        # no version counter: one last.ckpt per stage (resolve_resume keeps other runs' checkpoints out)
        pl.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir,
            save_last=True,
            save_top_k=1,
            every_n_train_steps=cfg.checkpoint.every_n_steps,
            enable_version_counter=False,
        ),
        ConfigInCheckpoint(plain(cfg)),
        *extra_callbacks,
        on_interrupt,
        *progress_bar(stage, cfg.trainer.get("enable_progress_bar", True)),
    ]
    logger = make_logger(cfg, run_dir, stage, start=False)
    if dashboards_on:  # the density histograms
        callbacks += dashboards.fit_callbacks(cfg.get("dashboards") or {}, run_dir / stage)
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(run_dir),
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    start_run(logger, cfg)
    t0 = time.perf_counter()
    with on_interrupt.guard(trainer):
        trainer.fit(lit, datamodule=dm, ckpt_path=ckpt_path)
    seconds = time.perf_counter() - t0
    if trainer.is_global_zero:
        remove_superseded(ckpt_dir, cfg)  # a step checkpoint this fit resumed from, once a newer one exists
    return trainer, logger, seconds


def fit(
    cfg: DictConfig,
    run_dir: Path,
    stage: str = "train",
    datamodule=None,
    sae=None,
    callbacks: tuple[pl.Callback, ...] = (),
) -> FitResult:
    """Build (unless given) and train one SAE; checkpoints go to <run_dir>/checkpoints/<stage>/.
    `callbacks` join the fit's own."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_dir = run_dir / "checkpoints" / stage
    _remove_leftovers(run_dir, stage, ckpt_dir)
    ckpt_path = resolve_resume(cfg, ckpt_dir)  # before anything is built: a refusal costs nothing
    dm = build_source(cfg, datamodule)
    sae = sae if sae is not None else instantiate(cfg.sae)
    lit = build_lit(cfg, sae)
    health.before_fit(lit)  # a schedule that cannot be built, an objective that cannot make the SAE sparse
    trainer, logger, seconds = run_trainer(cfg, run_dir, stage, lit, dm, ckpt_path, callbacks)
    health.after_fit(lit, dm, trainer)  # under lit.on_degenerate=stop a diverged SAE is never exported
    health.record(run_dir, stage, lit.health_warnings)
    return FitResult(lit, dm, trainer, logger, seconds)


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
