"""Learning-rate schedules, as partial constructors for config."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_decay(
    optimizer: Optimizer, warmup_steps: int = 0, decay_fraction: float = 0.0, total_steps: int = 1
) -> LambdaLR:
    """Linear warm-up over `warmup_steps`, constant, then linear decay to 0 over the last `decay_fraction` of steps."""
    decay_start = int(total_steps * (1 - decay_fraction))

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay_fraction > 0 and step >= decay_start:
            return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
        return 1.0

    return LambdaLR(optimizer, factor)
