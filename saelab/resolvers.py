"""OmegaConf resolvers that saelab's configs use; `saelab.train` registers them when it is imported.

`${saelab.dead_window:${trainer.max_steps},${data.batch_size}}` is the default dead-latent window: a
latent is dead once it has fired on none of the last W training tokens, with

    W = min(10M, max(batch_size, ⌊share · max_steps · batch_size⌋)),  share = 0.1,

so a latent must stay silent for a tenth of the run (one batch at least) and never longer than the 10M
tokens of sparsify and dictionary_learning (Gao et al. 2024, arXiv:2406.04093, count 10M tokens at their
scale). A fixed token count cannot serve every run length: 1M tokens is longer than a 600k-token run, so the
AuxK term (which only sees dead latents) would never fire in it; SAELens counts 1,000 steps for the same
reason. A run of unbounded length (`max_steps=-1`) gets the 10M cap. The training counter, the AuxK term
and the `core` evaluator's `dead_frac` all use this one window (`lit.dead_window_tokens`).
"""

from __future__ import annotations

from omegaconf import OmegaConf

DEAD_WINDOW_CAP = 10_000_000
DEAD_WINDOW_SHARE = 0.1


def dead_window(max_steps: int | None, batch_size: int) -> int:
    """The default dead-latent window in tokens for a run of `max_steps` steps of `batch_size` rows."""
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"data.batch_size must be a positive integer, got {batch_size!r}")
    if max_steps is None or type(max_steps) is not int or max_steps < 1:
        return DEAD_WINDOW_CAP
    return int(min(DEAD_WINDOW_CAP, max(batch_size, int(DEAD_WINDOW_SHARE * max_steps * batch_size))))


def register() -> None:
    if not OmegaConf.has_resolver("saelab.dead_window"):
        OmegaConf.register_new_resolver("saelab.dead_window", dead_window)
