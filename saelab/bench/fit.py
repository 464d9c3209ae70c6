"""A whole fit against the sum of its bare training steps, on the same batches in one process.

The fit is `saelab.train.fit` with the default config (logger, validation, checkpoints, dead-latent
counter, density histograms, progress bar) on a TopK SAE with MSE + AuxK; its time is the wall time of
`Trainer.fit` (model and data built before). The bare steps are the same `LitSAE` step without Lightning:
`train_step` (forward, objective with AuxK, dead-latent count), backward, parallel-gradient removal, Adam
step, decoder renormalisation, LR scheduler step, in a plain Python loop over the same batches. Both read
batches already in memory (sampled once from the synthetic source), so what the ratio shows is the
bookkeeping around the step: Lightning's loop, logging, validation, checkpointing, the data loader.

The bare loop runs before and after the fit and the ratio takes their mean, so a change of load from
other processes during the measurement shows as a gap between the two bare times (printed).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
from torch import Tensor
from torch.utils.data import DataLoader

from saelab.bench.topk import Size, _table

FULL = Size(128, 2048, 16, 1024)
QUICK = Size(32, 256, 4, 128)
STEPS, QUICK_STEPS = 3000, 60
DISTINCT = 200  # distinct batches, cycled (3000 × 1024 × 128 floats would be 1.5 GB)
TARGET = 1.15  # a whole fit ≤ 1.15× the sum of its bare steps


class InMemory(pl.LightningDataModule):
    """Training batches cycled from a list in memory; validation reads the first `val` of them."""

    def __init__(self, batches: list[Tensor], steps: int, val: int = 4) -> None:
        super().__init__()
        self.batches, self.steps, self.val = batches, steps, val
        self.d_in = batches[0].shape[1]

    def train_dataloader(self) -> DataLoader:
        seq = [self.batches[i % len(self.batches)] for i in range(self.steps)]
        return DataLoader(seq, batch_size=None)  # type: ignore[arg-type]

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.batches[: self.val], batch_size=None)  # type: ignore[arg-type]


def config(size: Size, steps: int, extra: list[str] | None = None):
    """The default config at this size (no evaluators: they run after the fit, not in it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from saelab.__main__ import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                f"data.d_in={size.d_in}",
                f"data.batch_size={size.batch}",
                f"sae.d_sae={size.d_sae}",
                f"sae.activation.k={size.k}",
                f"trainer.max_steps={steps}",
                "eval/metrics=[]",
                *(extra or []),
            ],
        )


def make_source(size: Size, n: int) -> list[Tensor]:
    from saelab.data.synthetic import SyntheticFeatures

    feats = SyntheticFeatures(size.d_in, max(4 * size.d_in, 64), 8.0, 0.8, 8, 3, 0.4, 0.0, 0)
    return [feats.sample(size.batch, g)[0] for g in range(n)]


def bare_seconds(cfg, batches: list[Tensor], steps: int) -> float:
    """Wall time of `steps` bare LitSAE steps over `batches` (cycled), from a freshly built SAE."""
    from hydra.utils import instantiate

    from saelab.train import build_lit

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    lit = build_lit(cfg, instantiate(cfg.sae))
    lit.log_every = steps + 1  # the step's own metrics are logging, which the fit is charged for
    found = lit.configure_optimizers()
    opt, sched = (
        (found["optimizer"], found["lr_scheduler"]["scheduler"]) if isinstance(found, dict) else (found, None)
    )
    t0 = time.perf_counter()
    for step in range(steps):
        loss, _ = lit.train_step(batches[step % len(batches)], step)
        loss.backward()
        lit.sae.remove_parallel_decoder_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lit.sae.set_decoder_norm_to_unit()
        if sched is not None:
            sched.step()
    return time.perf_counter() - t0


def fit_seconds(cfg, batches: list[Tensor], steps: int) -> tuple[float, int]:
    """`Trainer.fit` wall time of the default fit over the same batches, and the dead latents it ended with."""
    from omegaconf import open_dict

    from saelab.train import fit, wandb_scope

    run = Path(tempfile.mkdtemp(prefix="saelab-bench-fit-"))
    try:
        with open_dict(cfg):
            cfg.run_dir = str(run)
        res = fit(cfg, run, datamodule=InMemory(batches, steps))
        with wandb_scope(res.logger):  # end the W&B run: a later logger in this process would reuse it
            return res.seconds, int(res.lit.dead_mask().sum())
    finally:
        shutil.rmtree(run, ignore_errors=True)


def main(args: argparse.Namespace) -> list[str]:
    quick = getattr(args, "quick", False)
    size = (QUICK if quick else FULL).with_args(args)
    steps = getattr(args, "steps", None) or (QUICK_STEPS if quick else STEPS)
    if getattr(args, "device", "cpu") != "cpu":
        return [f"fit overhead is measured on the CPU only (asked for {args.device})"]
    batches = make_source(size, min(DISTINCT, steps))
    rows = []
    for logger in ("csv", "wandb_offline"):
        extra = [f"logger={logger}", "+trainer.enable_progress_bar=true"]
        cfg = config(size, steps, extra)
        before = bare_seconds(cfg, batches, steps)
        whole, dead = fit_seconds(config(size, steps, extra), batches, steps)
        after = bare_seconds(cfg, batches, steps)
        bare = (before + after) / 2
        ratio = whole / bare
        mark = "ok" if ratio <= TARGET else "MISSES"
        rows.append(
            [
                logger,
                f"{1e3 * bare / steps:.2f}",
                f"{1e3 * whole / steps:.2f}",
                f"{ratio:.3f}x",
                f"{before:.1f} / {after:.1f}",
                str(dead),
                f"{mark} (≤ {TARGET}x)",
            ]
        )
    head = (
        f"whole fit vs its bare steps: {size}, {steps} steps, MSE + AuxK (window "
        f"{config(size, steps).lit.dead_window_tokens} tokens), default validation/checkpoint/logging"
    )
    return [
        head,
        *_table(
            [
                "logger",
                "bare ms/step",
                "fit ms/step",
                "fit/bare",
                "bare s before / after",
                "dead at end",
                "target",
            ],
            rows,
        ),
    ]
