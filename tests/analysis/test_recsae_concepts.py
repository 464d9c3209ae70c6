"""Concept dictionary: profiles by hand, best-F1 thresholds by brute force, a planted genre latent recovered;
`concept_latents` against precision/recall counted one history at a time."""

from __future__ import annotations

import pytest
import torch

from saelab.analysis.concepts import (
    best_f1_thresholds,
    build_dictionary,
    concept_latents,
    confidence,
    dense_codes,
    history_profiles,
)


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


class ReLUCodes:
    """A stand-in SAE whose codes are its (rectified) inputs: z = max(x, 0)."""

    def __init__(self, d_sae: int) -> None:
        self.d_sae = d_sae

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)


def planted_split(attrs: torch.Tensor, n: int, seed: int):
    """Like `planted`, but the windows are returned (same generator order) so the rows can be rebuilt."""
    g = torch.Generator().manual_seed(seed)
    win = torch.randint(1, len(attrs), (n, 8), generator=g)
    codes = torch.rand(n, 16, generator=g) * (torch.rand(n, 16, generator=g) < 0.1)
    horror = history_profiles(win, attrs, decay=1.0)[:, 2]
    codes[:, 3] = torch.where(horror >= 0.5, 1.0 + horror, torch.zeros(()))
    return {"acts": codes, "window": win, "item": win[:, -1]}


SETTINGS = dict(decay=1.0, n_top=50, min_lift=1.5, min_support=0.1, max_concepts=2, min_active=10,
                confidence_bar=0.5)  # fmt: skip


def attrs_and_names():
    names = ["genre:Action", "genre:Comedy", "genre:Horror", "decade:1990s", "title:night"]
    attrs = torch.rand(61, 5, generator=torch.Generator().manual_seed(0)) < 0.3
    attrs[0] = False
    titles = [""] + [f"Film {i}" for i in range(1, 61)]
    return attrs, names, titles


def test_concept_latents_match_a_by_hand_confidence_and_order():
    attrs, names, titles = attrs_and_names()
    fit, held = planted_split(attrs, 2000, seed=1), planted_split(attrs, 2000, seed=2)
    res = concept_latents(ReLUCodes(16), fit, held, attrs, names, titles, **SETTINGS)

    dic = res.dictionary
    assert sorted(r.latent for r in res.latents) == sorted(dic.latents.tolist())
    p_held = history_profiles(held["window"], attrs, 1.0)
    for rec in res.latents:
        c = dic.latents.tolist().index(rec.latent)
        # precision / recall / F1 of "score ≥ τ" against "active", counted one history at a time
        tp = fp = fn = 0
        for h in range(len(held["acts"])):
            pred = float(p_held[h] @ dic.weights[:, c]) >= float(dic.thresholds[c])
            act = bool(held["acts"][h, rec.latent] > 0)
            tp, fp, fn = tp + (pred and act), fp + (pred and not act), fn + (act and not pred)
        assert rec.precision == pytest.approx(tp / max(1, tp + fp), abs=1e-6)
        assert rec.recall == pytest.approx(tp / max(1, tp + fn), abs=1e-6)
        assert rec.f1 == pytest.approx(2 * tp / max(1, 2 * tp + fp + fn), abs=1e-6)
        rho = (tp + fn) / len(held["acts"])
        assert rec.baseline_f1 == pytest.approx(2 * rho / (1 + rho), abs=1e-6)
        assert rec.n_active_heldout == tp + fn
        assert rec.confident == (rec.f1 >= 0.5 and rec.f1 > rec.baseline_f1)
        assert rec.max_fit == pytest.approx(float(fit["acts"][:, rec.latent].max()))
        assert list(rec.concepts) == [names[a] for a in rec.attrs] == dic.names(c)
        # examples: titles of the newest items of the 12 top-activating fit rows, first occurrences
        top = fit["acts"][:, rec.latent].argsort(descending=True)[:12].tolist()
        expected: list[str] = []
        for row in top:
            t = titles[int(fit["item"][row])]
            if t not in expected:
                expected.append(t)
        assert rec.examples == expected[:4]

    # above-baseline latents first, each group by held-out F1, highest first
    beats = [r.f1 > r.baseline_f1 for r in res.latents]
    assert beats == sorted(beats, reverse=True)
    for flag in (True, False):
        f1s = [r.f1 for r, b in zip(res.latents, beats, strict=True) if b == flag]
        assert f1s == sorted(f1s, reverse=True)

    # the planted Horror latent comes first, confidently; the counts are those of the records
    assert res.latents[0].latent == 3 and res.latents[0].confident
    assert next(iter(res.latents[0].concepts)) == "genre:Horror"
    m = res.metrics
    assert m["n_alive_latents"] == int((fit["acts"] > 0).any(0).sum()) == 16
    assert m["n_with_concepts"] == len(res.latents)
    assert m["n_confident"] == sum(r.confident for r in res.latents)
    assert m["n_above_baseline"] == sum(beats)
    assert m["n_confident_pr"] == sum(
        r.precision >= 0.5 and r.recall >= 0.5 and r.f1 > r.baseline_f1 for r in res.latents
    )
    assert m["mean_f1_heldout"] == pytest.approx(sum(r.f1 for r in res.latents) / len(res.latents))
    assert m["mean_f1_fit"] == pytest.approx(sum(r.f1_fit for r in res.latents) / len(res.latents))


def test_concept_latents_report_pieces_and_act_scale(tmp_path):
    attrs, names, titles = attrs_and_names()
    fit, held = planted_split(attrs, 1000, seed=3), planted_split(attrs, 1000, seed=4)
    res = concept_latents(ReLUCodes(16), fit, held, attrs, names, titles, **SETTINGS)
    headers, rows = res.table(2)
    assert len(headers) == len(rows[0]) == 8 and len(rows) == min(2, len(res.latents))
    assert rows[0][0] == res.latents[0].latent and "genre:Horror" in rows[0][6]
    assert f"{res.metrics['n_with_concepts']} of 16 live latents" in res.note()
    assert res.plot(tmp_path / "confidence.png").exists()
    assert res.records()[0]["latent"] == 3 and set(res.records()[0]) >= {"f1", "concepts", "examples"}

    # a source that stored x/s with act_scale s gives the SAE the same inputs, hence the same dictionary
    half = {**fit, "acts": fit["acts"] / 2}, {**held, "acts": held["acts"] / 2}
    scaled = concept_latents(ReLUCodes(16), *half, attrs, names, titles, **SETTINGS, act_scale=2.0)
    assert scaled.records() == res.records()

    # an SAE with no concept latents: empty records, zero means, no figure
    empty = {**fit, "acts": torch.zeros_like(fit["acts"])}, {**held, "acts": torch.zeros_like(held["acts"])}
    none = concept_latents(ReLUCodes(16), *empty, attrs, names, titles, **SETTINGS)
    assert none.latents == [] and none.metrics["n_alive_latents"] == 0
    assert none.metrics["mean_f1_heldout"] == 0
    assert none.plot(tmp_path / "none.png") is None


def test_dense_codes_batches_and_scales():
    x = torch.randn(10, 16)
    assert torch.equal(dense_codes(ReLUCodes(16), x, batch_size=3), x.clamp_min(0))
    assert torch.equal(dense_codes(ReLUCodes(16), x, act_scale=2.0), (2 * x).clamp_min(0))
    assert dense_codes(ReLUCodes(16), x[:0]).shape == (0, 16)
