"""What a run shows beyond its scalar curves: in its W&B run, and the same offline in its run dir.

- **Feature density over training** (`DensityHistograms`): every `density_every` steps, a histogram of
  log10 per-latent firing frequency over the tokens since the previous one, f_j = c_j / n (c_j: tokens on
  which latent j fired, n: tokens seen in the window), as `density/log10_freq` (`wandb.Histogram`) at the
  step that ends the window (`trainer/global_step`, counted in optimiser steps done). The bins are fixed
  for the whole run: `bins` equal bins on [`log10_min`, 0] (frequencies below the first edge count in the
  first bin) and, left of them, one more bin of the same width for the latents that did not fire in the
  window (log10 0 = −∞ has no bin of its own). This is the feature-density histogram of Bricken et al.
  2023 ("Towards Monosemanticity"), drawn over time. At fit end the windows are drawn as one heatmap,
  `<run dir>/<stage>/density_over_training.png`, with its numbers in `density_over_training.json`,
  whatever the logger (logger=none too). The counts come from `LitSAE.fired_since_density`, which the
  step's dead-latent counter fills from the firing counts it already computes; under DDP they are summed
  over ranks when a histogram is made.
- **Learning rate**: logged with the training scalars every `lit.log_every` steps, as `lr-<Optimizer>`
  (`saelab.lit.learning_rates`; `<name>/lr` per SAE of a multi-SAE fit), wherever a logger is.
- **Top-activating contexts** (`contexts_table`): a `wandb.Table` with one row per (latent, context) whose
  context cell is HTML, each token shaded by the latent's activation on it (`context_html`).
- **The exported SAE** (`log_export`): the export directory as a W&B `model` artifact of the stage's run;
  offline, the artifact's files are the export in the run dir, which `wandb sync` uploads (so the export
  must stay as it is until then).

Every W&B call is made only when the logger is Lightning's `WandbLogger` (by class name, as
`saelab.report` does); other loggers and no logger skip them quietly. Nothing here needs the network.
"""

from __future__ import annotations

import contextlib
import html
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pytorch_lightning as pl
import torch
from jaxtyping import Int
from torch import Tensor

from saelab.files import atomic_write_json

if TYPE_CHECKING:
    from saelab.lit import LitSAE

DENSITY_KEY = "density/log10_freq"
DENSITY_FILE = "density_over_training"  # .png and .json in the stage's out dir

# the defaults of conf/config.yaml `dashboards:`, for configs that have no such node (density off)
DEFAULTS: dict[str, Any] = {
    "density_every": 0,
    "density_bins": 50,
    "density_log10_min": -7.0,
    "artifact": True,
}


def is_wandb(logger: Any) -> bool:
    return logger is not None and type(logger).__name__ == "WandbLogger"


def fit_callbacks(settings: Mapping[str, Any], out_dir: Path) -> list[pl.Callback]:
    """The dashboards' callbacks of one fit: the density histograms unless `settings["density_every"]` is 0.
    `settings` is the `dashboards:` config node (or {})."""
    s = DEFAULTS | dict(settings)
    found: list[pl.Callback] = []
    if int(s["density_every"]) > 0:
        found.append(
            DensityHistograms(
                int(s["density_every"]), out_dir, int(s["density_bins"]), s["density_log10_min"]
            )
        )
    return found


# ---------------------------------------------------------------------- feature density
def density_edges(bins: int, log10_min: float) -> np.ndarray:
    """The bins+2 edges in log10 frequency: the silent bin [lo − w, lo), then `bins` bins of width w on
    [lo, 0] (w = −lo / bins)."""
    w = -log10_min / bins
    return np.concatenate([[log10_min - w], np.linspace(log10_min, 0.0, bins + 1)])


def density_histogram(
    fired: Int[Tensor, " d_sae"], n_tokens: int, bins: int = 50, log10_min: float = -7.0
) -> np.ndarray:
    """Latents per bin of log10 firing frequency, [bins + 1] (bin 0: fired on none of the `n_tokens`).

    f_j = fired_j / n_tokens; a firing latent falls in bin 1 + ⌊(log10 f_j − lo) / w⌋ with lo = `log10_min`
    and w = −lo / bins, clamped to [1, bins] (f_j = 1 is in the last bin, f_j < 10**lo in the first).
    """
    if n_tokens < 1:
        raise ValueError(f"a density histogram needs at least one token, got n_tokens={n_tokens}.")
    _check_bins(bins, log10_min)
    c = fired.detach().to("cpu", torch.float64).numpy()
    counts = np.zeros(bins + 1, dtype=np.int64)
    counts[0] = int((c == 0).sum())
    x = np.log10(c[c > 0] / n_tokens)
    idx = np.clip(np.floor((x - log10_min) / (-log10_min / bins)).astype(np.int64), 0, bins - 1)
    counts[1:] += np.bincount(idx, minlength=bins)
    return counts


def _check_bins(bins: int, log10_min: float) -> None:
    if not (bins >= 1 and math.isfinite(log10_min) and log10_min < 0):
        raise ValueError(
            f"density histogram bins={bins}, log10_min={log10_min}: set dashboards.density_bins to a "
            "positive integer and dashboards.density_log10_min to a negative number, e.g. -7."
        )


class DensityHistograms(pl.Callback):
    """Every `every` optimiser steps: a histogram of the latents' firing frequency since the last one
    (`density_histogram`), logged to W&B at that step; at fit end the heatmap of all of them.

    Args:
        every: steps per window (and histogram).
        out_dir: where `density_over_training.png` / `.json` are written at fit end (the stage's out dir).
        bins, log10_min: the fixed bins (`density_edges`).

    Windows start where the fit starts: a resumed fit draws the steps it ran. A last window shorter than
    `every` steps is drawn at fit end too (its frequencies are per token, so it compares).
    """

    def __init__(self, every: int, out_dir: Path, bins: int = 50, log10_min: float = -7.0) -> None:
        if every < 1:
            raise ValueError(f"DensityHistograms needs every >= 1 step, got {every}.")
        self.every, self.out_dir, self.bins, self.log10_min = int(every), Path(out_dir), int(bins), log10_min
        _check_bins(self.bins, log10_min)
        self.edges = density_edges(self.bins, float(log10_min))
        self.start = self.last = 0  # the step the fit started from; the step that ended the last window
        self.steps: list[int] = []  # the step that ends each window
        self.tokens: list[int] = []  # tokens in each window (all ranks)
        self.rows: list[np.ndarray] = []  # [bins + 1] latents per bin, per window

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self.last = int(trainer.global_step)
        self.steps, self.tokens, self.rows = [], [], []
        lit = cast("LitSAE", pl_module)
        lit.fired_since_density.zero_()
        lit.tokens_since_density = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = int(trainer.global_step)  # after this batch's optimiser step
        if step % self.every == 0 and step != self.last:  # not again for the micro-batches of one step
            self._window(trainer, pl_module, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(trainer.global_step)
        if step != self.last:
            self._window(trainer, pl_module, step)  # the steps since the last full window
        if trainer.is_global_zero and self.rows:
            self._write_heatmap(trainer)

    def _window(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Close the window ending at `step`. Every rank calls it at the same steps (`last` is kept on
        every rank), since the sums over ranks are collectives; rank 0 keeps, logs and draws the result."""
        self.last = step
        lit = cast("LitSAE", pl_module)
        buf = lit.fired_since_density  # [d_sae] this rank's firings in the window
        fired = trainer.strategy.reduce(buf.clone(), reduce_op="sum")  # every rank takes part
        n = trainer.strategy.reduce(
            torch.tensor(lit.tokens_since_density, device=buf.device), reduce_op="sum"
        )
        buf.zero_()
        lit.tokens_since_density = 0
        if int(n) == 0 or not trainer.is_global_zero:
            return
        row = density_histogram(fired, int(n), self.bins, self.log10_min)
        self.steps.append(step)
        self.tokens.append(int(n))
        self.rows.append(row)
        for run in _wandb_runs(trainer):
            import wandb

            hist = wandb.Histogram(np_histogram=(row.tolist(), self.edges.tolist()))
            run.log({DENSITY_KEY: hist, "trainer/global_step": step})  # as WandbLogger.log_metrics does

    def _write_heatmap(self, trainer: pl.Trainer) -> None:
        from saelab.analysis.plots import save

        png = save(
            density_figure(self.start, self.steps, self.rows, self.edges),
            self.out_dir / f"{DENSITY_FILE}.png",
        )
        atomic_write_json(
            self.out_dir / f"{DENSITY_FILE}.json",
            {
                "start": self.start,
                "steps": self.steps,
                "tokens": self.tokens,
                "edges_log10": self.edges.tolist(),  # edges_log10[0:2] bound the silent bin
                "counts": [r.tolist() for r in self.rows],  # [window][bin], bin 0 = silent in the window
            },
        )
        for run in _wandb_runs(trainer):
            import wandb

            run.log({f"figures/{DENSITY_FILE}": wandb.Image(str(png), caption="density over training")})


def _wandb_runs(trainer: pl.Trainer) -> list[Any]:
    """The W&B runs of the trainer's loggers (none for other loggers)."""
    return [cast(Any, lg).experiment for lg in trainer.loggers if is_wandb(lg)]


def density_figure(start: int, steps: Sequence[int], rows: Sequence[np.ndarray], edges: np.ndarray):
    """Heatmap of latents per log10-frequency bin (y) for each window of steps (x: window i spans
    (steps[i-1], steps[i]], the first from `start`); the bottom row holds the latents silent in the window."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    from saelab.analysis.plots import REFERENCE

    counts = np.stack(rows).T.astype(np.float64)  # (bins + 1, windows)
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    x = np.asarray([start, *steps], dtype=np.float64)
    masked = np.ma.masked_equal(counts, 0)  # empty cells stay white
    mesh = ax.pcolormesh(x, edges, masked, cmap="viridis", norm=LogNorm(vmin=1, vmax=max(1.0, counts.max())))
    fig.colorbar(mesh, ax=ax, label="latents")
    ax.axhline(edges[1], **REFERENCE)  # below it: latents silent in the window
    # whole decades, leaving out one too close to the silent bin's label to read
    decades = [v for v in range(math.ceil(edges[1]), 1) if v >= edges[1] - 0.05 * edges[1]]
    ax.set_yticks([(edges[0] + edges[1]) / 2, *decades], ["silent", *map(str, decades)])
    ax.set_xlabel("step")
    ax.set_ylabel("log10 firing frequency")
    ax.set_title("Latent firing density over training")
    return fig


# ---------------------------------------------------------------------- top-activating contexts
def context_html(
    tokens: Sequence[int],
    acts: Sequence[float],
    decode: Callable[[int], str],
    peak: float,
    center: int | None = None,
) -> str:
    """One context as HTML: each token shaded orange by act / `peak` (its title holds the activation), the
    selected token (`center`) outlined; ids < 0 (outside the document) are left out."""
    spans = []
    for i, (t, a) in enumerate(zip(tokens, acts)):
        if t < 0:
            continue
        alpha = min(1.0, max(0.0, float(a) / peak)) if peak > 0 else 0.0
        style = f"background-color: rgba(255, 140, 0, {alpha:.2f})"
        if i == center:
            style += "; outline: 1px solid #333"
        spans.append(f'<span style="{style}" title="{float(a):.3g}">{html.escape(decode(int(t)))}</span>')
    return '<div style="font-family: monospace; white-space: pre-wrap">' + "".join(spans) + "</div>"


def contexts_table(records: Any, decode: Callable[[int], str], latents: Sequence[int], k: int = 5) -> Any:
    """A `wandb.Table` of each latent's `k` top-activating contexts from `records` (`FeatureRecords`):
    columns latent, density, rank, activation, context (`wandb.Html`, tokens shaded by activation, shading
    relative to the latent's top activation)."""
    import wandb

    left = int(records.window[0])  # the selected token's place in its window
    rows = []
    for j in latents:
        r = records.latent(int(j))
        peak = max((c.act for c in r.top), default=0.0)
        for rank, c in enumerate(r.top[:k]):
            cell = wandb.Html(
                context_html(c.tokens, c.acts, decode, peak, left), inject=False, data_is_not_path=True
            )
            rows.append([r.latent, r.density, rank, c.act, cell])
    return wandb.Table(columns=["latent", "density", "rank", "activation", "context"], data=rows)


def log_contexts(
    logger: Any,
    records: Any,
    decode: Callable[[int], str],
    latents: Sequence[int],
    k: int = 5,
    key: str = "tables/top_contexts",
) -> None:
    """Log `contexts_table(records, decode, latents, k)` under `key` to a W&B logger; others skip it."""
    if is_wandb(logger):
        logger.experiment.log({key: contexts_table(records, decode, latents, k)})


# ---------------------------------------------------------------------- the exported SAE
def artifact_name(run_name: str) -> str:
    """A W&B artifact name from a run name: letters, digits, `-`, `_` and `.` only, at most 128 characters
    (`train/train sae.activation.k=4` → `train-train-sae.activation.k-4`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", run_name).strip("-.")[:128] or "sae"


def log_export(
    logger: Any, export: Path | None, settings: Mapping[str, Any], metadata: Mapping | None = None
) -> None:
    """Log the export directory as a `model` artifact of the W&B run, named after the run (each run of the
    same name adds a version); skipped for other loggers, without an export, or with `artifact: false`."""
    if not is_wandb(logger) or export is None or not (DEFAULTS | dict(settings))["artifact"]:
        return
    import wandb

    run = logger.experiment
    art = wandb.Artifact(artifact_name(run.name or "sae"), type="model", metadata=dict(metadata or {}))
    # offline, the artifact's files are the export itself, so the run dir holds everything `wandb sync`
    # uploads (W&B would otherwise copy the weights to its staging area under ~/.local/share until then);
    # online, W&B uploads from a copy, which a later write to the export cannot change
    # W&B prints "Adding directory to artifact" whatever the run's settings say; a silent run stays silent
    quiet = contextlib.redirect_stderr(io.StringIO()) if run.settings.silent else contextlib.nullcontext()
    with quiet:
        art.add_dir(str(export), policy="immutable" if run.offline else "mutable")
        run.log_artifact(art)
