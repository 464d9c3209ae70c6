"""results.json and report.md writers shared by every recipe."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from saelab.files import atomic_write_json, atomic_write_text


def clean(obj):
    """Make results JSON-safe: tensors → lists, NaN → None, nested dicts/lists recursively."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return clean(obj.tolist()) if obj.numel() > 1 else clean(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_results(run_dir: Path, results: dict) -> Path:
    path = Path(run_dir) / "results.json"
    atomic_write_json(path, clean(results))
    return path


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(run_dir: Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """report.md: a title and (heading, markdown body) sections; images are referenced relatively."""
    body = [f"# {title}", ""]
    for heading, text in sections:
        body += [f"## {heading}", "", text.strip(), ""]
    path = Path(run_dir) / "report.md"
    atomic_write_text(path, "\n".join(body))
    return path
