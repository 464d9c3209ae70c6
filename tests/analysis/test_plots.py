"""The report plot helpers (`saelab.analysis.plots`): reference lines, axis labels, values on bars."""

from __future__ import annotations

import math

from saelab.analysis import plots


def test_bars_name_the_groups_draw_zero_and_write_values():
    fig = plots.bars_figure(
        ["a", "b"], {"x": [0.0, -0.5], "y": [0.25, math.nan]}, "Δ", "t", xlabel="group", value_fmt="{:.2f}"
    )
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("group", "Δ", "t")
    assert [t.get_text() for t in ax.texts] == ["0.00", "-0.50", "0.25", ""]  # a missing value stays blank
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [[0.0, 0.0]]  # some bar is below zero
    (ax,) = plots.bars_figure(["a"], {"x": [0.3]}, "v", "t").axes
    assert not ax.get_lines() and not ax.texts


def test_reference_lines_are_drawn_and_named_in_the_legend():
    (ax,) = plots.histogram_figure([0.2, 0.4], "x", "t", vlines={"bar 0.9": 0.9}).axes
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0.9, 0.9] and ax.get_xlim()[1] > 0.9
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["bar 0.9"]
    (ax,) = plots.scatter_figure({"sae": ([1, 2], [5.0, 4.0])}, "L0", "ppl", "t", hlines={"clean": 3.0}).axes
    assert [list(line.get_ydata()) for line in ax.get_lines()][1] == [3.0, 3.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sae", "clean"]


def test_save_writes_a_png(tmp_path):
    path = plots.save(plots.bars_figure(["a"], {"x": [1.0]}, "v", "t"), tmp_path / "b.png")
    assert path == tmp_path / "b.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
