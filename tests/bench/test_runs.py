"""The whole-run bench sections (`fit`, `multi`, `parallel`) on tiny sizes: each prints its table with a
ratio per row. The sizes are far too small for the ratios to mean anything; the full sizes are in
`python -m saelab.bench`."""

from __future__ import annotations

import re

import pytest

from saelab.bench.__main__ import main


def _rows(text: str) -> dict[str, list[str]]:
    return {ln.split("  ")[0].strip(): ln.split() for ln in text.splitlines() if re.search(r"\d\.\d{3}x", ln)}


def test_bench_fit_compares_a_whole_fit_with_its_bare_steps(capsys):
    assert main(["--quick", "--steps", "8", "--sections", "fit"]) == 0
    text = capsys.readouterr().out
    assert "whole fit vs its bare steps: d_in=32 d_sae=256 k=4 batch=128, 8 steps" in text
    rows = _rows(text)
    assert set(rows) == {"csv", "wandb_offline"}
    for r in rows.values():
        assert float(r[1]) > 0 and float(r[2]) > 0 and r[3].endswith("x")
        assert float(r[3].rstrip("x")) == pytest.approx(float(r[2]) / float(r[1]), rel=0.05)


@pytest.mark.slow  # five and four `python -m saelab` processes
@pytest.mark.parametrize(
    ("section", "last"), [("multi", "one fit of 2 SAEs"), ("parallel", "joblib, 2 jobs")]
)
def test_bench_whole_run_sections(capsys, section, last):
    assert main(["--quick", "--sections", section]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.startswith(last)]
    assert len(lines) == 1 and re.search(r"\d\.\d{3}x \((ok|MISSES), target ≤ [\d.]+x\)", lines[0])
