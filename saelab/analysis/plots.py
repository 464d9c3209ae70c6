"""PNG plots for reports (matplotlib, non-interactive backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from saelab.files import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def density_histogram(density, path: Path, title: str = "Latent firing density") -> Path:
    """Histogram of log10 firing frequency per latent; dead latents are counted at the left edge."""
    d = np.asarray(density, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(np.log10(d + 1e-10), bins=50, color="#4472c4")
    ax.set_xlabel("log10 firing frequency (dead at -10)")
    ax.set_ylabel("latents")
    ax.set_title(title)
    return _save(fig, path)


def histogram(values, path: Path, xlabel: str, title: str, bins: int = 40) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(np.asarray(values, dtype=np.float64), bins=bins, color="#70ad47")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    return _save(fig, path)


def bars(
    groups: Sequence[str], series: Mapping[str, Sequence[float]], path: Path, ylabel: str, title: str
) -> Path:
    """Grouped bar chart: one group per entry of `groups`, one bar per series."""
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(groups) + 2), 3.4))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def scatter(
    points: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """Labelled scatter/line plot: one series per entry (x values, y values)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, (xs, ys) in points.items():
        ax.plot(xs, ys, "o-", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


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
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, a in arrays.items():
        ax.hist(a, bins=edges.tolist(), histtype="step", linewidth=1.4, density=density, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density" if density else "count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)
