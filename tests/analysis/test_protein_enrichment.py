"""Enrichment statistics against scipy, counts against brute force, and a planted latent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import false_discovery_control, fisher_exact

from saelab.analysis.enrichment import (
    benjamini_hochberg,
    count_contingency,
    enrichment,
    fisher_greater,
    heatmap,
    heatmap_figure,
)


def test_fisher_greater_on_a_known_table():
    # active × annotated table [[8, 2], [1, 5]]: N=16, K=9 annotated, n=10 active, k=8 both
    p = fisher_greater(8, 10, 9, 16)
    # by hand: P(X ≥ 8) = [C(9,8)C(7,2) + C(9,9)C(7,1)] / C(16,10) = (9·21 + 7) / 8008
    assert p == pytest.approx((9 * 21 + 7) / 8008, rel=1e-12)
    assert p == pytest.approx(fisher_exact([[8, 2], [1, 5]], alternative="greater").pvalue, rel=1e-10)


def test_hypergeometric_sf_equals_one_sided_fisher_on_random_tables():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b, c, d = rng.integers(0, 30, size=4)
        n_total, n_active, n_pos = a + b + c + d, a + b, a + c
        ref = fisher_exact([[a, b], [c, d]], alternative="greater").pvalue
        assert fisher_greater(a, n_active, n_pos, n_total) == pytest.approx(ref, rel=1e-9, abs=1e-15)


def test_bh_matches_scipy_and_a_hand_example():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # sorted 0.005, 0.01, 0.03, 0.04, 0.5 → ·5/rank = 0.025, 0.025, 0.05, 0.05, 0.5 (already monotone)
    np.testing.assert_allclose(benjamini_hochberg(p), [0.025, 0.05, 0.05, 0.025, 0.5])
    rng = np.random.default_rng(1)
    for shape in [(50,), (7, 13)]:
        q = rng.uniform(size=shape) ** 3
        np.testing.assert_allclose(benjamini_hochberg(q), false_discovery_control(q.ravel()).reshape(shape))


def test_counts_match_brute_force():
    g = torch.Generator().manual_seed(0)
    codes = torch.rand(300, 6, generator=g) * (torch.rand(300, 6, generator=g) < 0.3)
    labels = torch.rand(300, 2, generator=g) < 0.4
    chunks = [(codes[s : s + 70], labels[s : s + 70]) for s in range(0, 300, 70)]
    c = count_contingency(chunks, [0.0, 0.5], ["a", "b"])
    assert c.n_total == 300
    for ti, t in enumerate([0.0, 0.5]):
        for a in range(2):
            for j in range(6):
                on = codes[:, j] > t
                assert c.active[ti, j] == int(on.sum())
                assert c.active_pos[ti, a, j] == int((on & labels[:, a]).sum())
    assert c.n_pos.tolist() == labels.sum(0).tolist()


def test_planted_latent_is_ranked_first(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, d_sae = 2000, 40
    labels = torch.zeros(n, 2, dtype=torch.bool)
    labels[100:160, 0] = True  # a 60-residue "zinc finger"
    labels[:, 1] = torch.rand(n, generator=g) < 0.2
    codes = torch.rand(n, d_sae, generator=g) * (torch.rand(n, d_sae, generator=g) < 0.05)
    # decoys: one fires on a superset of the annotation, one on a subset
    codes[:, [3, 4]] = 0.0
    codes[80:200, 3] = 2.0
    codes[110:140, 4] = 2.0
    codes[:, 17] = 0.0
    codes[labels[:, 0], 17] = 1.5  # the planted latent: fires exactly on annotated residues
    res = enrichment(count_contingency([(codes, labels)], [0.1], ["zinc_finger", "noise"]))
    ranked = res.ranked("zinc_finger", 0)
    assert ranked[0] == 17
    assert {3, 4} <= set(ranked)
    top = res.top("zinc_finger", 0, k=1)[0]
    assert top["precision"] == 1.0 and top["recall"] == 1.0 and top["active_annotated"] == 60
    assert res.pvalues[0, 0, 17] == res.pvalues[0, 0].min()
    assert res.n_significant(0.05)[0, 0] >= 3
    # by precision the subset decoy ties with the planted latent (both 1.0); the p-value breaks the tie
    assert res.ranked("zinc_finger", 0, by="precision")[:2] == [17, 4]
    assert 4 not in res.ranked("zinc_finger", 0, by="precision", min_support=31)
    heatmap(res, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000
    ax, bar = heatmap_figure(res).axes  # the map and its colour bar, each axis named
    assert (ax.get_xlabel(), bar.get_ylabel()) == ("annotation", "F1") and ax.get_ylabel().startswith("top 3")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["zinc_finger", "noise"]
