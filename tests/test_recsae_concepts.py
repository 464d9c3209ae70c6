"""Concept dictionary: profiles by hand, best-F1 thresholds by brute force, a planted genre latent recovered."""

from __future__ import annotations

import pytest
import torch

from saelab.analysis.concepts import best_f1_thresholds, build_dictionary, confidence, history_profiles


def test_profiles_by_hand():
    attrs = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)  # item 0 = padding
    win = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 2]])
    uniform = history_profiles(win, attrs, decay=1.0)
    assert uniform.flatten().tolist() == pytest.approx([2 / 3, 2 / 3, 0.0, 1.0])
    last = history_profiles(win, attrs, decay=0.0)
    assert last.tolist() == [[1.0, 1.0], [0.0, 1.0]]
    half = history_profiles(win, attrs, decay=0.5)  # weights 0.25, 0.5, 1 for items 1, 2, 3
    assert half[0].tolist() == pytest.approx([(0.25 + 1) / 1.75, (0.5 + 1) / 1.75])


def test_best_f1_threshold_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(40, 5, generator=g).round(decimals=1)
    active = torch.rand(40, 5, generator=g) < 0.4
    tau, f1 = best_f1_thresholds(scores, active)
    for j in range(5):
        best = max(
            (
                2
                * ((scores[:, j] >= t) & active[:, j]).sum()
                / ((scores[:, j] >= t).sum() + active[:, j].sum())
            ).item()
            for t in scores[:, j].unique().tolist()
        )
        assert f1[j].item() == pytest.approx(best)
        pred = scores[:, j] >= tau[j]
        assert (2 * (pred & active[:, j]).sum() / (pred.sum() + active[:, j].sum())).item() == pytest.approx(
            best
        )


def planted(attrs: torch.Tensor, n: int, seed: int):
    """Random 8-item histories; latent 3 fires (with the Horror share as value) iff ≥ half the items are Horror."""
    g = torch.Generator().manual_seed(seed)
    win = torch.randint(1, len(attrs), (n, 8), generator=g)
    codes = torch.rand(n, 16, generator=g) * (
        torch.rand(n, 16, generator=g) < 0.1
    )  # background noise latents
    prof = history_profiles(win, attrs, decay=1.0)
    horror = prof[:, 2]
    codes[:, 3] = torch.where(horror >= 0.5, 1.0 + horror, torch.zeros(()))
    return codes, prof


def test_planted_genre_latent_is_recovered_with_precision_and_recall_near_one():
    names = ["genre:Action", "genre:Comedy", "genre:Horror", "decade:1990s", "title:night"]
    attrs = (
        torch.rand(61, 5, generator=torch.Generator().manual_seed(0)) < 0.3
    )  # 60 items, 5 random attributes
    attrs[0] = False
    codes_fit, prof_fit = planted(attrs, 3000, seed=1)
    codes_held, prof_held = planted(attrs, 3000, seed=2)

    dic = build_dictionary(codes_fit, prof_fit, names, n_top=50, min_lift=1.5, min_support=0.1, min_active=10)
    r = dic.latents.tolist().index(3)
    assert dic.names(r)[0] == "genre:Horror"
    assert dic.lifts[r][0] > 1.5
    conf = confidence(dic, codes_held, prof_held)
    assert conf["n_active"][r] > 50
    assert conf["precision"][r] > 0.95 and conf["recall"][r] > 0.95 and conf["f1"][r] > 0.95
    # the noise latents get no confident concept
    others = [i for i, j in enumerate(dic.latents.tolist()) if j != 3]
    assert all(conf["f1"][i] < 0.5 for i in others)
