"""A whole fit against the sum of its bare training steps, on the same batches in one process.

The fit is `saelab.train.fit` with the default config (logger, validation, checkpoints, dead-latent
counter, density histograms, progress bar) on a TopK SAE with MSE + AuxK. The bare steps are the same
`LitSAE` step without Lightning, on a second copy of the SAE built from the same seed: `train_step`
(forward, objective with AuxK, dead-latent count), backward, parallel-gradient removal, Adam step, decoder
renormalisation, LR scheduler step, in a plain Python loop over the same batches. Both read batches already
in memory (sampled once from the synthetic source), so what the ratio shows is the bookkeeping around the
step: Lightning's loop, logging, validation, checkpointing, the progress bar.

The two are interleaved: every `SEGMENT` steps of the fit, a callback runs the bare copy up to the same
step. The callback's own wall time is taken out of the fit's, so "fit" is `Trainer.fit`'s wall time less
the bare segments, and "bare" is the sum of the segments. Run one after the other, two 3000-step loops on
this kind of shared machine differ by up to a fifth in speed (the machine's speed drifts over tens of
seconds); interleaved every 100 steps, both see the same machine. The segments' spread is printed.

A short untimed fit with each logger runs first. The first fit of a process imports what the fit's last
steps and the dashboards need (matplotlib for the density heatmap; pandas, which W&B imports at the first
histogram it logs): about 0.4 s each here, paid once per process, not once per fit or step.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from saelab.bench.topk import Size, _table

FULL = Size(128, 2048, 16, 1024)
QUICK = Size(32, 256, 4, 128)
STEPS, QUICK_STEPS = 3000, 60
DISTINCT = 200  # distinct batches, cycled (3000 × 1024 × 128 floats would be 1.5 GB)
TARGET = 1.15  # a whole fit ≤ 1.15× the sum of its bare steps
SEGMENT = 100  # the bare copy catches up with the fit every this many steps
WARM_STEPS = 10  # an untimed fit per logger first


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


class BareSteps:
    """The fit's step without Lightning, on its own copy of the SAE (built from `cfg` and its seed)."""

    def __init__(self, cfg, batches: list[Tensor]) -> None:
        from hydra.utils import instantiate

        from saelab.train import build_lit

        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        self.lit = build_lit(cfg, instantiate(cfg.sae))
        self.lit.log_every = 1 << 62  # the step's own metrics are logging, which the fit is charged for
        found = self.lit.configure_optimizers()
        self.opt = found["optimizer"] if isinstance(found, dict) else found
        self.sched = found["lr_scheduler"]["scheduler"] if isinstance(found, dict) else None
        self.batches, self.done, self.seconds = batches, 0, 0.0
        self.per_step: list[float] = []  # seconds per step of each segment

    def run_to(self, step: int) -> float:
        """Run the steps up to `step` (exclusive); their wall time. The global RNG is left as it was."""
        n = step - self.done
        if n <= 0:
            return 0.0
        rng = torch.get_rng_state()
        lit, t0 = self.lit, time.perf_counter()
        for i in range(self.done, step):
            loss, _ = lit.train_step(self.batches[i % len(self.batches)], i)
            loss.backward()
            lit.sae.remove_parallel_decoder_grad()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            lit.sae.set_decoder_norm_to_unit()
            if self.sched is not None:
                self.sched.step()
        seconds = time.perf_counter() - t0
        torch.set_rng_state(rng)
        self.done, self.seconds = step, self.seconds + seconds
        self.per_step.append(seconds / n)
        return seconds


class Interleave(pl.Callback):
    """Every `every` steps of the fit, run the bare copy up to the fit's step; `inside` is the wall time
    spent here, which is not the fit's."""

    def __init__(self, bare: BareSteps, every: int) -> None:
        self.bare, self.every, self.inside = bare, every, 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.global_step % self.every == 0:
            t0 = time.perf_counter()
            self.bare.run_to(trainer.global_step)
            self.inside += time.perf_counter() - t0


def measure(cfg, batches: list[Tensor], steps: int, segment: int) -> tuple[float, BareSteps, int]:
    """The default fit over `batches` with its bare copy interleaved every `segment` steps: the fit's wall
    time less the bare segments, the bare copy (its `seconds` and `per_step`), and the fit's dead latents."""
    from omegaconf import open_dict

    from saelab.train import fit, wandb_scope

    bare = BareSteps(cfg, batches)
    interleave = Interleave(bare, segment)
    run = Path(tempfile.mkdtemp(prefix="saelab-bench-fit-"))
    try:
        with open_dict(cfg):
            cfg.run_dir = str(run)
        res = fit(cfg, run, datamodule=InMemory(batches, steps), callbacks=(interleave,))
        with wandb_scope(res.logger):  # end the W&B run: a later logger in this process would reuse it
            dead = int(res.lit.dead_mask().sum())
        bare.run_to(steps)  # none left unless `steps` is not a multiple of `segment`
        return res.seconds - interleave.inside, bare, dead
    finally:
        shutil.rmtree(run, ignore_errors=True)


def main(args: argparse.Namespace) -> list[str]:
    quick = getattr(args, "quick", False)
    size = (QUICK if quick else FULL).with_args(args)
    steps = getattr(args, "steps", None) or (QUICK_STEPS if quick else STEPS)
    segment = max(1, min(SEGMENT, steps // 4))
    if getattr(args, "device", "cpu") != "cpu":
        return [f"fit overhead is measured on the CPU only (asked for {args.device})"]
    batches = make_source(size, min(DISTINCT, steps))
    loggers = ("csv", "wandb_offline")
    for logger in loggers:  # imports: the first fit of a process pays them, and they are not the loop's
        measure(
            config(size, WARM_STEPS, [f"logger={logger}", "dashboards.density_every=5"]),
            batches,
            WARM_STEPS,
            5,
        )
    rows = []
    for logger in loggers:
        cfg = config(size, steps, [f"logger={logger}", "+trainer.enable_progress_bar=true"])
        whole, bare, dead = measure(cfg, batches, steps, segment)
        ratio = whole / bare.seconds
        ms = sorted(1e3 * t for t in bare.per_step)
        mark = "ok" if ratio <= TARGET else "MISSES"
        rows.append(
            [
                logger,
                f"{1e3 * bare.seconds / steps:.2f}",
                f"{1e3 * whole / steps:.2f}",
                f"{ratio:.3f}x",
                f"{ms[0]:.1f} / {statistics.median(ms):.1f} / {ms[-1]:.1f}",
                str(dead),
                f"{mark} (≤ {TARGET}x)",
            ]
        )
    head = (
        f"whole fit vs its bare steps: {size}, {steps} steps, MSE + AuxK (window "
        f"{config(size, steps).lit.dead_window_tokens} tokens), default validation/checkpoint/logging; "
        f"bare steps interleaved every {segment} steps"
    )
    return [
        head,
        *_table(
            [
                "logger",
                "bare ms/step",
                "fit ms/step",
                "fit/bare",
                "bare segments min / median / max ms",
                "dead at end",
                "target",
            ],
            rows,
        ),
    ]
