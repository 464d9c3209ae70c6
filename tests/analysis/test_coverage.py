"""Coverage tables across SAEs (`saelab.analysis.coverage.coverage_rows`)."""

from __future__ import annotations

from saelab.analysis.coverage import coverage_rows


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
