"""The report builder: one place that turns a run's metrics, tables and figures into every output.

A recipe adds what it measured (`add_metrics`, `add_eval`, `add_table`, `add_figure`, `add_text`,
`add_data`) and calls `write(logger)` once, which writes

- `results.json`: `{"name", "metrics": {flat namespaced scalars}, **data}` (every figure's numbers too),
- `report.md`: the sections in order, tables as Markdown, figures as relative PNG links,
- the W&B run's summary (scalars), `tables/<slug>` (wandb.Table; top-activating contexts with their
  tokens shaded by activation, `saelab.dashboards.contexts_table`) and `figures/<slug>` (wandb.Image), or
  `log_metrics` for other Lightning loggers,
- the terminal: the report's title, the tables marked for it under their headings, then the run dir.

All files are written atomically, so a killed run never leaves a half-written report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.eval.base import EvalResult, Table
from saelab.files import atomic_write_json, atomic_write_text


def clean(obj: Any) -> Any:
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


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "item"


@dataclass
class _Section:
    heading: str
    kind: str  # "table" | "figure" | "text" | "contexts"
    payload: Any
    note: str = ""
    terminal: bool = False


class Report:
    """Collects a run's results; `write()` emits results.json, report.md, W&B and the terminal table.

    Args:
        run_dir: where results.json, report.md and (by convention) the PNGs live.
        title: the report's title.
        name: the run's name (results.json `name`).
    """

    def __init__(self, run_dir: str | Path, title: str, name: str) -> None:
        self.run_dir, self.title, self.name = Path(run_dir), title, name
        self.metrics: dict[str, Any] = {}
        self.data: dict[str, Any] = {}
        self.sections: list[_Section] = []

    # ------------------------------------------------------------------ collecting
    def add_metrics(self, metrics: Mapping[str, Any], prefix: str = "") -> Report:
        for k, v in metrics.items():
            key = f"{prefix}{k}"
            if key in self.metrics:
                raise ValueError(f"metric {key!r} is reported twice; give one of them a prefix.")
            self.metrics[key] = v
        return self

    def add_data(self, key: str, value: Any) -> Report:
        """A section of results.json beside `metrics` (non-scalar results: curves, lists, per-latent records)."""
        if key in ("name", "metrics") or key in self.data:
            raise ValueError(f"results.json already has a {key!r} entry.")
        self.data[key] = value
        return self

    def add_table(self, heading: str, table: Table, note: str = "", terminal: bool = False) -> Report:
        self.sections.append(_Section(heading, "table", table, note, terminal))
        return self

    def add_figure(self, caption: str, path: str | Path, heading: str = "Figures") -> Report:
        self.sections.append(_Section(heading, "figure", (caption, Path(path))))
        return self

    def add_text(self, heading: str, text: str) -> Report:
        self.sections.append(_Section(heading, "text", text.strip()))
        return self

    def add_contexts(
        self,
        heading: str,
        records: Any,
        decode: Callable[[int], str],
        latents: Sequence[int],
        k: int = 5,
    ) -> Report:
        """The `k` top-activating contexts of `latents` from `records` (`FeatureRecords`): in report.md a
        table with each context's firing tokens in <<marks>>; in W&B a table of HTML cells, tokens shaded
        by activation (`saelab.dashboards.contexts_table`)."""
        self.sections.append(_Section(heading, "contexts", (records, decode, [int(j) for j in latents], k)))
        return self

    def add_eval(
        self,
        result: EvalResult,
        prefix: str = "",
        metrics: bool = True,
        tables: bool = True,
        figures: bool = True,
        label: str = "",
    ) -> Report:
        """An evaluator result: metrics under `prefix`, its data under results.json `eval/<prefix>`, its
        tables and figures as sections (headings carry `label`)."""
        if metrics:
            self.add_metrics(result.metrics, prefix)
        if result.data:
            self.data.setdefault("eval", {})[prefix.rstrip("/") or "all"] = result.data
        suffix = f" ({label})" if label else ""
        if tables:
            for heading, t in result.tables.items():
                self.add_table(heading[:1].upper() + heading[1:] + suffix, t)
        if figures:
            for caption, path in result.figures.items():
                self.add_figure(caption + suffix, path)
        return self

    # ------------------------------------------------------------------ writing
    def add_metrics_table(self, heading: str = "Metrics", terminal: bool = True) -> Report:
        """Every scalar metric collected so far, sorted by name."""
        rows = [[k, v] for k, v in sorted(self.metrics.items()) if isinstance(v, (int, float))]
        return self.add_table(heading, Table(["metric", "value"], rows), terminal=terminal)

    def results(self) -> dict:
        return clean({"name": self.name, "metrics": self.metrics, **self.data})

    def markdown(self) -> str:
        body = [f"# {self.title}", ""]
        last_heading = None
        for s in self.sections:
            if s.heading != last_heading:
                body += [f"## {s.heading}", ""]
                last_heading = s.heading
            if s.kind == "table":
                body += [markdown_table(s.payload.headers, s.payload.rows), ""]
                if s.note:
                    body += [s.note.strip(), ""]
            elif s.kind == "figure":
                caption, path = s.payload
                body += [f"![{caption}]({self._rel(path)})", ""]
            elif s.kind == "contexts":
                body += [markdown_table(*_contexts_rows(*s.payload)), ""]
            else:
                body += [s.payload, ""]
        return "\n".join(body)

    def _rel(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.run_dir.resolve()))
        except ValueError:
            return str(path)

    def write(self, logger: Any = None, print_tables: bool = True) -> dict:
        """Write results.json and report.md, log to `logger` (W&B or any Lightning logger), print tables."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        results = self.results()
        atomic_write_json(self.run_dir / "results.json", results)
        atomic_write_text(self.run_dir / "report.md", self.markdown())
        if logger is not None:
            self._log(logger)
        if print_tables:
            # Markdown with the report's title and each table's heading, as report.md has them
            shown = [s for s in self.sections if s.kind == "table" and s.terminal]
            if shown:
                print(f"# {self.title}\n")
            for s in shown:
                print(f"## {s.heading}\n{markdown_table(s.payload.headers, s.payload.rows)}\n")
            print(f"run dir: {self.run_dir}")
        return results

    def _log(self, logger: Any) -> None:
        flat = {
            k: v for k, v in self.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if type(logger).__name__ != "WandbLogger":
            logger.log_metrics(flat)
            logger.save()
            return
        import wandb

        run = logger.experiment
        run.summary.update(flat)
        media: dict[str, Any] = {}
        for s in self.sections:
            if s.kind == "table":
                rows = _typed_columns(s.payload.rows, len(s.payload.headers))
                media[f"tables/{slug(s.heading)}"] = wandb.Table(columns=list(s.payload.headers), data=rows)
            elif s.kind == "contexts":
                from saelab.dashboards import contexts_table

                media[f"tables/{slug(s.heading)}"] = contexts_table(*s.payload)
            elif s.kind == "figure" and Path(s.payload[1]).exists():
                media[f"figures/{slug(s.payload[0])}"] = wandb.Image(str(s.payload[1]), caption=s.payload[0])
        if media:
            run.log(media)


def _contexts_rows(
    records: Any, decode: Callable[[int], str], latents: Sequence[int], k: int
) -> tuple[list[str], list[list]]:
    """Headers and rows of the Markdown contexts table: latent, density, rank, activation, context (tokens
    where the latent fires in <<marks>>, Markdown's `|` escaped)."""
    rows = []
    for j in latents:
        r = records.latent(j)
        for rank, c in enumerate(r.top[:k]):
            text = "".join(
                f"<<{decode(t)}>>" if a > 0 else decode(t) for t, a in zip(c.tokens, c.acts) if t >= 0
            )
            text = text.replace("|", "\\|").replace("\n", " ")
            rows.append([r.latent, f"{r.density:.2e}", rank, c.act, text])
    return ["latent", "density", "rank", "activation", "context"], rows


def _typed_columns(rows: Sequence[Sequence], n_cols: int) -> list[list]:
    """Rows for a wandb.Table, whose columns must each hold one type: a column of numbers (blanks → None)
    stays numeric, any other column becomes text."""

    def number(c: Any) -> bool:
        return isinstance(c, (int, float)) and not isinstance(c, bool)

    blank = (None, "")
    numeric = [all(number(r[j]) or r[j] in blank for r in rows) for j in range(n_cols)]
    return [[(None if c in blank else c) if numeric[j] else fmt(c) for j, c in enumerate(r)] for r in rows]


def summary_table(
    rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str], first: str = "name"
) -> Table:
    """A table with one row per entry of `rows` ({row name: {column: value}}), missing cells blank."""
    return Table([first, *columns], [[name, *[r.get(c, "") for c in columns]] for name, r in rows.items()])
