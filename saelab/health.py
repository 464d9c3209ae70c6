"""Run health: refuse runs that cannot train, flag runs that train to nothing.

Three checks, each answered according to `lit.on_degenerate` (`warn`: one `saelab: WARNING:` line on stderr,
kept for results.json `warnings`; `stop`: `DegenerateRunError`, so the CLI exits with that one line and
nothing is exported):

- before the fit, the LR schedule is built once on a throwaway optimiser, so a schedule that cannot
  place itself (`warmup_decay` without a length, `trainer.max_steps=-1`) fails before any step (always
  an error: there is nothing to warn about, the run would not train);
- before the fit, an objective without a sparsity term (`l1`, `l0`) on an activation without built-in
  sparsity (ReLU, JumpReLU) is flagged: nothing pushes its codes to zero;
- at every validation and once after the fit, a diverged SAE is flagged: non-finite or strongly negative
  explained variance (EV < −1, i.e. the reconstruction error has more than twice the data's variance),
  or no latent firing at all.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_only

from saelab.eval.base import batch_acts, fired_counts, take
from saelab.eval.metrics import DeadFraction, ExplainedVariance
from saelab.objectives import L0, L1, Objective

MODES = ("warn", "stop")
EV_FLOOR = -1.0  # below this explained variance a run has diverged, not merely learnt little
_STOP_HINT = "lit.on_degenerate=stop makes this an error"
_WARN_HINT = "lit.on_degenerate=warn trains on regardless"
_DIVERGED = "the run diverged"

# {run dir: {stage: warnings}}, for the run's results.json (a sweep's jobs in one process keep theirs apart)
_RECORDED: dict[str, dict[str, list[str]]] = {}


class DegenerateRunError(RuntimeError):
    """The run diverged or cannot become sparse, and `lit.on_degenerate=stop` asked to stop."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"lit.on_degenerate must be one of {', '.join(MODES)}, got {mode!r}.")
    return mode


def flag(problem: str, mode: str) -> str:
    """Raise `DegenerateRunError(problem)` under `stop`; else print the warning line (on rank 0) and return it."""
    if check_mode(mode) == "stop":
        raise DegenerateRunError(f"{problem} ({_WARN_HINT}).")
    line = f"{problem} ({_STOP_HINT})."
    _say(line)
    return line


def record(run_dir: str | Path, stage: str, warnings: list[str]) -> None:
    """Keep a stage's warnings for its run's report (a stage fitted again replaces its own)."""
    _RECORDED.setdefault(str(Path(run_dir).resolve()), {})[stage] = list(warnings)


def recorded(run_dir: str | Path) -> list[str]:
    """The warnings of the stages fitted in `run_dir` by this process, each prefixed with its stage."""
    stages = _RECORDED.get(str(Path(run_dir).resolve()), {})
    return [f"{stage}: {w}" for stage, found in stages.items() for w in found]


# ---------------------------------------------------------------------- before the fit
def check_schedule(scheduler: Callable | None) -> None:
    """Build the LR schedule once on a throwaway optimiser, so that a schedule which cannot be built (a
    decay with no known length) stops the run before its first step rather than inside the fit."""
    if scheduler is not None:
        scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))


def sparsity_problem(activation: Any, objective: Objective) -> str | None:
    """Why this SAE cannot become sparse, or None: its activation selects no subset (`sparse` is False:
    ReLU, JumpReLU) and no objective term with a positive coefficient penalises active latents."""
    if getattr(activation, "sparse", False):
        return None  # TopK and BatchTopK keep k latents per row by construction
    if any(isinstance(t, (L1, L0)) and t.coeff > 0 for t in objective.terms.values()):
        return None
    name = type(activation).__name__
    term = "l0" if hasattr(activation, "heaviside") else "l1"
    kept = ",".join([*objective.terms, term])
    return (
        f"the objective ({', '.join(objective.terms)}) has no sparsity term and {name} has no built-in "
        f"sparsity, so nothing pushes latents to zero: add one (objective/terms=[{kept}]) or use sae=topk"
    )


# ---------------------------------------------------------------------- during and after the fit
def divergence(explained_variance: float, silent_frac: float) -> str | None:
    """What is wrong with a model of this held-out EV and share of latents that fired on none of the
    held-out tokens (`silent_frac`; 1 means no latent fires at all), or None when nothing is."""
    ev = float(explained_variance)
    if not math.isfinite(ev):
        return f"explained variance is {ev}"
    faults = []
    if ev < EV_FLOOR:
        faults.append(f"explained variance {ev:.3g} (worse than predicting the mean)")
    if float(silent_frac) >= 1.0:
        faults.append("no latent fires (every latent dead)")
    return ", ".join(faults) or None


def before_fit(lit: Any) -> None:
    """The checks before a `LitSAE` trains: its schedule builds, and its objective can make it sparse."""
    check_schedule(lit.scheduler_fn)
    problem = sparsity_problem(lit.sae.activation, lit.objective)
    if problem is not None:
        lit.health_warnings.append(flag(problem, lit.on_degenerate))


def check_divergence(lit: Any, explained_variance: float, silent_frac: float, where: str) -> None:
    """Flag a `LitSAE` whose model measures as diverged; once per fit (the first sighting says when)."""
    fault = divergence(explained_variance, silent_frac)
    if fault is None or any(w.startswith(_DIVERGED) for w in lit.health_warnings):
        return
    lr = getattr(lit.optimizer_fn, "keywords", {}).get("lr")
    at = f" (now {lr:g})" if isinstance(lr, (int, float)) else ""
    # a reconstruction worse than the mean points at the step size or the inputs; codes that all died
    # with a sane reconstruction, at the step size or an overweighted sparsity term
    ev = float(explained_variance)
    other = "check the input scale" if not ev >= EV_FLOOR else "lower the sparsity term's coeff"
    problem = f"{_DIVERGED}: {fault} {where}; lower optim.optimizer.lr{at} or {other}"
    lit.health_warnings.append(flag(problem, lit.on_degenerate))


def after_fit(lit: Any, datamodule: Any, trainer: Any, n_batches: int = 2) -> None:
    """Measure the trained SAE on `n_batches` held-out batches and flag it if it diverged (the last
    validation may lie many steps back, or never have run)."""
    measured = held_out_health(lit.sae, datamodule, n_batches)
    if not measured:
        return
    # rank 0's measurement decides, so that under DDP every rank stops or none does
    measured = trainer.strategy.broadcast(measured, src=0)
    where = f"after the fit (step {trainer.global_step}, {n_batches} held-out batches)"
    check_divergence(lit, measured["explained_variance"], measured["silent_frac"], where)


@torch.no_grad()
def held_out_health(sae: Any, datamodule: Any, n_batches: int = 2) -> dict[str, float]:
    """Explained variance of `sae` (in eval mode) on the first `n_batches` held-out batches of `datamodule`
    and the share of latents silent on all of them (`silent_frac`); {} when it has no validation split."""
    loader = getattr(datamodule, "val_dataloader", None)
    if loader is None:
        return {}
    dev = sae.W_dec.device
    ev = ExplainedVariance(sae.d_in, sync_on_compute=False).to(dev)
    silent = DeadFraction(sae.d_sae, sync_on_compute=False).to(dev)
    was_training = sae.training
    sae.eval()
    try:
        for batch in take(loader(), n_batches):
            x = batch_acts(batch).to(dev)
            out = sae(x)
            ev.update(out.x, out.x_hat)
            silent.update(fired_counts(out, sae.d_sae), x.shape[0])
    finally:
        sae.train(was_training)
    if int(silent.n) == 0:
        return {}
    return {"explained_variance": float(ev.compute()), "silent_frac": float(silent.compute())}


@rank_zero_only
def _say(line: str) -> None:
    print(f"saelab: WARNING: {line}", file=sys.stderr, flush=True)


def remind(warnings: list[str]) -> None:
    """Repeat a run's warnings under its report, where the first printing has long scrolled away."""
    for w in warnings:
        _say(w)
