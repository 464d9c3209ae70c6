"""Learning-rate schedules, as partial constructors for config."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_decay(
    optimizer: Optimizer, warmup_steps: int = 0, decay_fraction: float = 0.0, total_steps: int = 1
) -> LambdaLR:
    """Linear warm-up over `warmup_steps`, constant, then linear decay to 0 over the last `decay_fraction` of steps.

    The decay is placed by `total_steps` (wired to `trainer.max_steps`), so a decay needs a known length:
    with `total_steps` < 1 (Lightning's -1, "until stopped") it is refused rather than placed at step 0,
    which would hold the rate at 0 from the end of warm-up on. Without decay the length is never read,
    and such a run trains at the full rate after warm-up.
    """
    if decay_fraction > 0 and total_steps < 1:
        raise ValueError(
            f"the learning-rate decay (optim.scheduler.decay_fraction={decay_fraction}) needs the run's length, "
            f"but trainer.max_steps={total_steps} (until stopped): set trainer.max_steps to the number of "
            "steps, or optim.scheduler.decay_fraction=0 to train at a constant rate after warm-up."
        )
    decay_start = int(total_steps * (1 - decay_fraction))

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay_fraction > 0 and step >= decay_start:
            return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
        return 1.0

    return LambdaLR(optimizer, factor)
