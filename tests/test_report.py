"""The report builder: results.json, report.md, W&B media and the terminal, from one set of calls."""

from __future__ import annotations

import json
import math

import pytest

from saelab.analysis import plots
from saelab.eval.base import EvalResult, Table
from saelab.report import Report, markdown_table


def test_report_writes_json_markdown_and_terminal(tmp_path, capsys):
    fig = plots.histogram([1, 2, 2, 3], tmp_path / "figs" / "h.png", "x", "h")
    r = Report(tmp_path, "A title", "run1")
    r.add_metrics({"eval/l0": 3.0, "eval/bad": math.nan})
    r.add_eval(EvalResult(metrics={"ppl": 2.0}, data={"curve": [1, 2]}, figures={"hist": fig}), prefix="dom/")
    r.add_table("Comparison", Table(["sae", "ppl"], [["a", 2.0]]), note="lower is better", terminal=True)
    r.add_text("Notes", "plain *markdown*")
    res = r.write()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == res
    assert saved["metrics"] == {"eval/l0": 3.0, "eval/bad": None, "dom/ppl": 2.0}
    assert saved["eval"]["dom"] == {"curve": [1, 2]}
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# A title") and "![hist](figs/h.png)" in md and "lower is better" in md
    assert markdown_table(["sae", "ppl"], [["a", 2.0]]) in md
    out = capsys.readouterr().out
    assert "| a | 2 |" in out and f"run dir: {tmp_path}" in out


def test_report_refuses_duplicates(tmp_path):
    r = Report(tmp_path, "t", "n").add_metrics({"a": 1})
    with pytest.raises(ValueError, match="reported twice"):
        r.add_metrics({"a": 2})
    with pytest.raises(ValueError, match="already has"):
        r.add_data("metrics", {})


class _Run:
    def __init__(self):
        self.summary, self.logged = {}, []

    def log(self, d):
        self.logged.append(d)


class WandbLogger:  # same class name as Lightning's, so the report takes the W&B path
    def __init__(self):
        self.experiment = _Run()


def test_report_logs_summary_tables_and_images_to_wandb(tmp_path):
    import wandb

    fig = plots.histogram([1, 2], tmp_path / "h.png", "x", "h")
    r = Report(tmp_path, "t", "n").add_metrics({"m/x": 1.5, "m/flag": True})
    r.add_table("Per SAE", Table(["sae", "v"], [["a", 1.0], ["b", None]])).add_figure("my fig", fig)
    logger = WandbLogger()
    r.write(logger, print_tables=False)
    assert logger.experiment.summary == {"m/x": 1.5}
    (media,) = logger.experiment.logged
    assert isinstance(media["tables/per_sae"], wandb.Table) and media["tables/per_sae"].columns == [
        "sae",
        "v",
    ]
    assert isinstance(media["figures/my_fig"], wandb.Image)


def test_terminal_tables_carry_the_report_title_and_their_headings(tmp_path, capsys):
    r = Report(tmp_path, "A title", "run1")
    r.add_table("Comparison", Table(["sae", "ppl"], [["a", 2.0]]), terminal=True)
    r.add_table("Only in report.md", Table(["x"], [[1]]))
    r.write()
    out = capsys.readouterr().out
    assert out.startswith("# A title\n\n## Comparison\n| sae | ppl |") and "Only in report.md" not in out
