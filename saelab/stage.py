"""Stages: the steps recipes are made of.

`train_stage` trains one named SAE (one Lightning fit, one W&B run in the experiment's group), exports it
in SAELens format, runs the configured evaluators on its source and logs their summary; under DDP only
rank 0 exports and evaluates. `evaluate_stage` evaluates SAEs that are already trained (one W&B run).
`host_stage` trains a host model that saelab itself trains (SASRec) with the same Trainer settings,
and caches it by a key of what determines it. `finish` writes the report into its own W&B run.
`text_data` and `finetune_cfg` build a stage's datamodule (on Corpus objects) and a fine-tune's config.

Recipes read as a list of these calls; see `saelab/recipes/`.
"""

from __future__ import annotations

import copy
import io
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from saelab import dashboards, health
from saelab.checkpoint import AtomicCheckpointIO, ConfigInCheckpoint, newest_checkpoint
from saelab.checks import ConfigError, check_config
from saelab.eval.base import EvalResult, Evaluator, evaluate
from saelab.files import atomic_write_bytes, load_torch
from saelab.io import save_sae, source_metadata
from saelab.io.saelens import check_exportable
from saelab.report import Report
from saelab.sae import ResidualSAE
from saelab.train import (
    fit,
    log_summary,
    make_logger,
    plain,
    progress_bar,
    refuse_to_overwrite,
    wandb_scope,
)

HostModule = TypeVar("HostModule", bound=pl.LightningModule)  # host_stage returns the type it is given


@dataclass
class StageResult:
    """What a trained stage leaves: the SAE, its source, evaluation, export path and timings.

    `metrics` holds `eval/<metric>` for every evaluator metric plus `train/seconds` and `train/steps`.
    On ranks other than 0 under DDP, `is_global_zero` is False and nothing was exported or evaluated.
    """

    name: str
    sae: Any
    datamodule: Any
    eval: EvalResult = field(default_factory=EvalResult)
    metrics: dict[str, Any] = field(default_factory=dict)
    export: Path | None = None
    seconds: float = 0.0
    steps: int = 0
    is_global_zero: bool = True
    results: dict = field(default_factory=dict)  # what the report wrote, when the stage wrote one


def evaluators(metrics_cfg: DictConfig | Mapping | None) -> dict[str, Evaluator]:
    """Instantiate an `eval.metrics` node ({name: evaluator config}); None → no evaluators."""
    if not metrics_cfg:
        return {}
    return {name: instantiate(node) for name, node in metrics_cfg.items() if node is not None}


def text_data(cfg: DictConfig, corpus: Any, val_corpus: Any, host: Any = None, **sizes: Any) -> Any:
    """The configured text datamodule (`cfg.data`) on given Corpus objects (passed as objects, not config),
    on `host` (default: a new one from `cfg.data.host`); `sizes` override its token budgets
    (`train_tokens=`, `val_tokens=`)."""
    kwargs = {
        k: v for k, v in plain(cfg.data).items() if k not in ("_target_", "host", "corpus", "val_corpus")
    }
    host = host if host is not None else instantiate(cfg.data.host)
    return get_class(cfg.data._target_)(host=host, corpus=corpus, val_corpus=val_corpus, **(kwargs | sizes))


def finetune_cfg(
    cfg: DictConfig, init_from: Path, terms: DictConfig, max_steps: int, lr: float
) -> DictConfig:
    """The experiment's config for one fine-tune: start from the export `init_from` and train `terms` for
    `max_steps` steps at learning rate `lr`."""
    c = copy.deepcopy(cfg)
    with open_dict(c):
        c.sae.init_from, c.objective.terms = str(init_from), terms  # assigning a node copies it
        c.trainer.max_steps, c.optim.optimizer.lr = max_steps, lr
    return c


def train_stage(
    cfg: DictConfig,
    run_dir: Path,
    name: str,
    *,
    datamodule: Any = None,
    sae: Any = None,
    metrics: DictConfig | Mapping | None = None,
    export_dir: Path | None = None,
    out_dir: Path | None = None,
    metadata: dict | None = None,
    report: Callable[[StageResult], Report] | None = None,
) -> StageResult:
    """Fit the SAE of stage `name`, export it to `export_dir` (default `<run>/<name>/sae`) and evaluate it.

    Args:
        cfg: the (stage's) config: data, sae, objective, optim, trainer, logger, eval.metrics, export.
        run_dir: the run directory; checkpoints go to `<run>/checkpoints/<name>/`.
        datamodule, sae: built from `cfg.data` / `cfg.sae` unless given.
        metrics: evaluator configs (default `cfg.eval.metrics`).
        out_dir: where evaluators write figures (default `<run>/<name>`).
        metadata: extra export metadata.
        report: for single-stage recipes: builds the run's report from this stage's result; it is written
            (`Report.write`) into this stage's W&B run, so the run has one W&B run, not two.
    """
    check_config(cfg)  # recipes called from Python and derived stage configs are checked here too
    if cfg.get("export", True):
        sae = sae if sae is not None else instantiate(cfg.sae)
        check_export(sae)  # an SAE that cannot be exported stops now, not after its training
    res = fit(cfg, run_dir, stage=name, datamodule=datamodule, sae=sae)
    dm, trainer = res.datamodule, res.trainer
    out = StageResult(name, res.sae, dm, seconds=res.seconds, steps=int(trainer.global_step))
    with wandb_scope(res.logger):
        if cfg.get("export", True) and trainer.is_global_zero:
            # the export reads the host's raw activations: the source's input scale is folded into it
            meta = {"saelab_run": cfg.name, "stage": name, **source_metadata(dm), **(metadata or {})}
            scale = float(getattr(dm, "act_scale", 1.0) or 1.0)
            out.export = save_sae(res.sae, export_dir or run_dir / name / "sae", meta, act_scale=scale)
            # W&B: the export as a model artifact of this stage's run
            art = {"saelab_run": cfg.name, "stage": name, "steps": out.steps}
            dashboards.log_export(res.logger, out.export, cfg.get("dashboards") or {}, art)
        # later stages may start from this export on every rank
        trainer.strategy.barrier("saelab-export")
        if not trainer.is_global_zero:  # under DDP only rank 0 evaluates and reports
            out.is_global_zero = False
            return out
        chosen = evaluators(OmegaConf.select(cfg, "eval.metrics") if metrics is None else metrics)
        out.eval = evaluate(res.sae, dm, chosen, out_dir or run_dir / name)
        out.metrics = {f"eval/{k}": v for k, v in out.eval.metrics.items()}
        out.metrics |= {"train/seconds": res.seconds, "train/steps": out.steps}
        log_summary(res.logger, out.metrics)
        if report is not None:
            out.results = write_report(report(out), res.logger)
    return out


def check_export(sae: Any) -> None:
    """`ConfigError` naming the keys to change when `save_sae` could not write `sae`: a residual SAE exports
    as one stitched JumpReLU SAE, which needs a threshold for every latent of base and residual."""
    try:
        check_exportable(sae)
    except TypeError as e:
        if not isinstance(sae, ResidualSAE):
            raise ConfigError(f"{e}; choose another sae.activation, or set export=false.") from e
        base, res = (type(m.activation).__name__ for m in (sae.base, sae.residual))
        raise ConfigError(
            f"sae=residual on a {base} base (sae.base.path) with a {res} residual cannot be exported: the "
            "stitched export needs ReLU, JumpReLU or BatchTopK in both; use such a base export and "
            "sae.residual.activation, or set export=false to train without an export."
        ) from e


def evaluate_stage(
    cfg: DictConfig,
    run_dir: Path,
    name: str,
    saes: Mapping[str, Any],
    sources: Mapping[str, Any],
    metrics: DictConfig | Mapping | None = None,
) -> dict[str, dict[str, EvalResult]]:
    """Evaluate every SAE on every source → {source: {sae: EvalResult}}; one W&B run `name` gets the summary
    (`<sae>/<source>/<metric>`). Figures go to `<run>/<name>/<source>/<sae>/`."""
    chosen = evaluators(OmegaConf.select(cfg, "eval.metrics") if metrics is None else metrics)
    results: dict[str, dict[str, EvalResult]] = {}
    for src_name, src in sources.items():
        for sae_name, sae in saes.items():
            r = evaluate(sae, src, chosen, run_dir / name / src_name / sae_name, quiet=bool(results))
            results.setdefault(src_name, {})[sae_name] = r
    logger = make_logger(cfg, run_dir, name)
    with wandb_scope(logger):
        log_summary(
            logger,
            {
                f"{s}/{d}/{k}": v
                for d, per in results.items()
                for s, r in per.items()
                for k, v in r.metrics.items()
            },
        )
    return results


def host_stage(
    cfg: DictConfig,
    run_dir: Path,
    name: str,
    module: HostModule,
    datamodule: pl.LightningDataModule,
    key: dict,
    monitor: str | None = None,
    mode: str = "max",
    **trainer_kwargs: Any,
) -> tuple[HostModule, dict[str, Any]]:
    """Train a host model saelab trains itself (e.g. SASRec), or load it from `<run>/host/<name>.pt`.

    The cache holds `key` (what determines the model: hyper-parameters, corpus fingerprint, fit settings)
    next to the weights; a different key trains again. With `monitor`, the best checkpoint by that
    validation metric is kept. The fit is seeded with `cfg.seed` (as `train.fit` is), so a host trained twice
    is the same host. `trainer_kwargs` go to `pl.Trainer` (max_epochs, ...). Returns the module
    in eval mode with gradients off, and {"<name>/seconds", "<name>/cached"}.
    """
    cache = run_dir / "host" / f"{name}.pt"
    if cache.exists():
        # tensors and plain values only: a cache whose pickle would run code is refused (RefusedFile)
        blob = load_torch(cache, f"Delete it; saelab then trains {name} again.")
        if isinstance(blob, dict) and blob.get("key") == key:
            module.load_state_dict(blob["state_dict"])
            return module.eval().requires_grad_(False), {f"{name}/seconds": 0.0, f"{name}/cached": True}
        print(f"saelab: {cache} was trained with other settings; training {name} again.")
    # as train.fit does: dropout and any other global randomness of the fit follow cfg.seed
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_dir = run_dir / "checkpoints" / name
    best = pl.callbacks.ModelCheckpoint(
        dirpath=ckpt_dir, monitor=monitor, mode=mode, save_top_k=1 if monitor else 0, save_last=True
    )
    resume_from = _host_resume(cfg, ckpt_dir, key, name, finished=cache.exists())
    logger = make_logger(cfg, run_dir, name)
    bar = trainer_kwargs.get("enable_progress_bar", True)
    with wandb_scope(logger):
        trainer = pl.Trainer(
            accelerator=cfg.trainer.get("accelerator", "cpu"),
            devices=1,
            default_root_dir=str(run_dir),
            logger=logger if logger is not None else False,
            callbacks=[best, ConfigInCheckpoint(plain(cfg)), _KeyInCheckpoint(key), *progress_bar(name, bar)],
            plugins=[AtomicCheckpointIO()],
            enable_model_summary=False,
            num_sanity_val_steps=0,
            **trainer_kwargs,
        )
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
        seconds = time.perf_counter() - t0
    if monitor and best.best_model_path:
        sd = load_torch(best.best_model_path, f"Delete {ckpt_dir} and run again.")["state_dict"]
        module.load_state_dict(sd)
    buf = io.BytesIO()
    torch.save({"key": key, "state_dict": module.state_dict()}, buf)
    atomic_write_bytes(cache, buf.getvalue())
    return module.eval().requires_grad_(False), {f"{name}/seconds": seconds, f"{name}/cached": False}


class _KeyInCheckpoint(pl.Callback):
    """Stores a host stage's `key` (what determines the model) in each of its checkpoints."""

    def __init__(self, key: dict) -> None:
        self.key = key

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["saelab_host_key"] = self.key


def _host_resume(cfg: DictConfig, ckpt_dir: Path, key: dict, name: str, finished: bool) -> str | None:
    """The checkpoint a host stage continues from (resume=auto: the newest complete one, refused when it
    was written for another `key`), or None. Without resume=auto, the checkpoints of a fit that finished
    (`finished`: its cached weights exist, for other settings) are superseded and removed; those of a fit
    that did not finish are not overwritten."""
    if cfg.get("resume") != "auto" or finished:
        if finished and ckpt_dir.is_dir():
            for old in ckpt_dir.glob("*.ckpt"):
                old.unlink()
        refuse_to_overwrite(ckpt_dir)
        return None
    found = newest_checkpoint(ckpt_dir)
    if found is None:
        return None
    path, ckpt = found
    stored = ckpt.get("saelab_host_key")
    if stored != key:
        was: dict = stored if isinstance(stored, dict) else {}
        differ = sorted(k for k in was.keys() | key.keys() if was.get(k) != key.get(k))
        what = "; ".join(f"{k}: {was.get(k)!r} → {key.get(k)!r}" for k in differ) or "no key recorded"
        raise ValueError(
            f"resume=auto: {path} was written while training {name} with other settings ({what}): continue "
            "it with that run's overrides, or start this run in a new run dir."
        )
    if path.name != "last.ckpt":
        print(f"saelab: resume=auto: resuming {name} from {path.name}, the newest complete checkpoint.")
    return str(path)


def finish(cfg: DictConfig, report: Report, stage: str = "report") -> dict:
    """Write the report (results.json, report.md, terminal) and log it to its own W&B run in the group."""
    logger = make_logger(cfg, report.run_dir, stage)
    with wandb_scope(logger):
        return write_report(report, logger)


def write_report(report: Report, logger: Any = None) -> dict:
    """`report.write(logger)` with the warnings of the run's fits (`saelab.health`): in results.json
    (`warnings`) and report.md, and repeated on stderr below the terminal report."""
    found = health.recorded(report.run_dir)
    if found and "warnings" not in report.data:
        report.add_data("warnings", found)
        report.add_text("Warnings", "\n".join(f"- {w}" for w in found))
    results = report.write(logger)
    health.remind(found)
    return results
