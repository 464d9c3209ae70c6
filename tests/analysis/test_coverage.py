"""Coverage tables and plots across SAEs (`saelab.analysis.coverage.coverage_rows`, `coverage_figure`)."""

from __future__ import annotations

import pytest

from saelab.analysis.coverage import coverage_figure, coverage_rows


def test_coverage_table_leaves_out_bins_without_test_tokens():
    cov = {
        name: {"bins": ["0", "1–9", "≥10"], "bin_tokens": [5, 0, 7], "coverage": c}
        for name, c in (
            ("general", [0.2, float("nan"), 1.0]),
            ("erm", [0.4, float("nan"), 0.5]),
            ("term", [0.6, 0.0, 0.25]),
        )
    }
    headers, rows = coverage_rows(cov)
    assert headers == ["corpus count", "test tokens", "general", "erm", "term"]
    assert rows == [["0", 5, 0.2, 0.4, 0.6], ["≥10", 7, 1.0, 0.5, 0.25]]


def test_coverage_plot_labels_its_axes_and_every_bin_it_draws():
    """Bins without test tokens are not drawn; a bin no SAE covers still reads 0.00 above its bars."""
    headers = ["corpus count", "test tokens", "general", "term"]
    rows = [["0", 5, 0.2, 0.6], ["1–9", 0, float("nan"), float("nan")], ["≥10", 7, 0.0, 0.0]]
    (ax,) = coverage_figure(headers, rows, "coverage").axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0 (5)", "≥10 (7)"]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() == "coverage"
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.2, 0.0, 0.6, 0.0])  # general, then term
    assert [t.get_text() for t in ax.texts] == ["0.20", "0.00", "0.60", "0.00"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["general", "term"]
