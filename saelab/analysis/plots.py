"""PNG plots for reports (matplotlib, non-interactive).

Each `*_figure` function draws and returns a `matplotlib.figure.Figure` (tests read its axes); the function
of the same name without the suffix draws it and writes the PNG with `save`. Figures are built without
pyplot, so a figure that is never saved holds no global state.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from saelab.files import atomic_write_bytes  # noqa: E402

# how reference lines (thresholds, clean baselines) are drawn
REFERENCE: dict[str, Any] = {"color": "#7f7f7f", "linestyle": "--", "linewidth": 1.0}


def save(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG at `path` (atomically) and return the path."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path


def density_histogram(density, path: Path, title: str = "Latent firing density") -> Path:
    """Histogram of log10 firing frequency per latent; dead latents are counted at the left edge."""
    d = np.asarray(density, dtype=np.float64)
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.hist(np.log10(d + 1e-10), bins=50, color="#4472c4")
    ax.set_xlabel("log10 firing frequency (dead at -10)")
    ax.set_ylabel("latents")
    ax.set_title(title)
    return save(fig, path)


def histogram_figure(
    values, xlabel: str, title: str, bins: int = 40, vlines: Mapping[str, float] | None = None
) -> Figure:
    """Histogram of `values`, with a dashed vertical line at each {legend label: x} of `vlines`."""
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.hist(np.asarray(values, dtype=np.float64), bins=bins, color="#70ad47")
    for label, x in (vlines or {}).items():
        ax.axvline(x, label=label, **REFERENCE)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    if vlines:
        ax.legend(fontsize=8)
    return fig


def histogram(
    values, path: Path, xlabel: str, title: str, bins: int = 40, vlines: Mapping[str, float] | None = None
) -> Path:
    return save(histogram_figure(values, xlabel, title, bins, vlines), path)


def bars_figure(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    ylabel: str,
    title: str,
    xlabel: str = "",
    value_fmt: str | None = None,
) -> Figure:
    """Grouped bar chart: one group per entry of `groups`, one bar per series. `value_fmt` (e.g. "{:.2f}")
    writes each value above its bar, so a zero reads as 0 rather than as a missing bar; a line marks 0
    when some value is negative."""
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    fig = Figure(figsize=(max(5, 0.9 * len(groups) + 2), 3.4))
    ax = fig.subplots()
    for i, (name, vals) in enumerate(series.items()):
        drawn = ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name)
        if value_fmt is not None:
            labels = ["" if math.isnan(v) else value_fmt.format(v) for v in map(float, vals)]
            ax.bar_label(drawn, labels, fontsize=7, padding=1)
    if any(float(v) < 0 for vals in series.values() for v in vals):
        ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def bars(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    path: Path,
    ylabel: str,
    title: str,
    xlabel: str = "",
    value_fmt: str | None = None,
) -> Path:
    return save(bars_figure(groups, series, ylabel, title, xlabel, value_fmt), path)


def scatter_figure(
    points: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    hlines: Mapping[str, float] | None = None,
) -> Figure:
    """Labelled scatter/line plot: one series per entry (x values, y values), and a dashed horizontal line
    at each {legend label: y} of `hlines`."""
    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    for name, (xs, ys) in points.items():
        ax.plot(xs, ys, "o-", label=name)
    for label, y in (hlines or {}).items():
        ax.axhline(y, label=label, **REFERENCE)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def scatter(
    points: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str,
    hlines: Mapping[str, float] | None = None,
) -> Path:
    return save(scatter_figure(points, xlabel, ylabel, title, hlines), path)


def overlaid_histograms(
    series: Mapping[str, Sequence[float]],
    path: Path,
    xlabel: str,
    title: str,
    bins: int = 50,
    density: bool = True,
) -> Path:
    """Histograms of several series on shared bins, drawn as outlines (density by default, so series of
    different sizes, such as SAEs of different widths, compare)."""
    arrays = {name: np.asarray(v, dtype=np.float64) for name, v in series.items()}
    arrays = {name: a[np.isfinite(a)] for name, a in arrays.items()}
    filled = [a for a in arrays.values() if a.size]
    lo = min((float(a.min()) for a in filled), default=0.0)
    hi = max((float(a.max()) for a in filled), default=1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    for name, a in arrays.items():
        ax.hist(a, bins=edges.tolist(), histtype="step", linewidth=1.4, density=density, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density" if density else "count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save(fig, path)
