"""Latent ablation: an inactive latent changes nothing; boosting a concept direction raises the concept share;
the zero/boost sweep over concept latents against top-k lists computed by brute force."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from saelab.analysis.ablation import (
    ablate_concept_latents,
    ablate_latent,
    concept_item_mask,
    window_exclusion,
)
from saelab.analysis.concepts import ConceptLatent
from saelab.sae import SAE, TopK


def setup():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(41, 8, generator=g)  # 40 items + padding
    attrs = torch.zeros(41, 2, dtype=torch.bool)
    attrs[1:9, 0] = True  # items 1..8 carry the concept
    attrs[20:30, 1] = True
    sae = SAE(8, 16, TopK(3), seed=0).eval()
    with torch.no_grad():
        d = emb[1:9].mean(0)
        sae.W_dec[5] = d / d.norm()  # latent 5 points toward the concept items

    def score(u):
        s = u @ emb.t()
        s[:, 0] = float("-inf")
        return s

    reps = torch.randn(300, 8, generator=g)
    return sae, score, reps, attrs


def test_ablating_an_inactive_latent_changes_nothing():
    sae, score, reps, attrs = setup()
    z = sae.encode(reps)
    j = int((z == 0).sum(0).argmax())
    off = z[:, j] == 0
    assert off.sum() > 50
    items = concept_item_mask(attrs, [0])
    for keep_error in (True, False):
        out = ablate_latent(sae, reps[off], j, score, items, mode="zero", k=5, keep_error=keep_error)
        assert out["n_users"] == int(off.sum())
        assert out["delta"] == 0.0 and out["frac_changed"] == 0.0
        assert out["p_value"] == 1.0 and not out["significant"]
        assert out["share_before"] == out["share_after"]


def test_boosting_a_concept_latent_raises_the_concept_share():
    sae, score, reps, attrs = setup()
    items = concept_item_mask(attrs, [0])
    z = sae.encode(reps)
    off = z[:, 5] == 0
    out = ablate_latent(sae, reps[off], 5, score, items, mode="boost", value=6.0, k=5)
    # brute force: the top-5 of u + (6 − 0)·W_dec[5] against the top-5 of u
    u = reps[off]
    moved = u + 6.0 * sae.W_dec[5].detach()
    before = score(u).topk(5).indices
    after = score(moved).topk(5).indices
    assert out["share_before"] == pytest.approx(items[before].float().mean().item())
    assert out["share_after"] == pytest.approx(items[after].float().mean().item())
    assert out["delta"] > 0.2 and out["p_value"] < 1e-6 and out["significant"]
    # zeroing where it is active moves the other way (or not at all), never toward the concept
    on = z[:, 5] > 0
    if on.sum() >= 2:
        assert ablate_latent(sae, reps[on], 5, score, items, mode="zero", k=5)["delta"] <= 0


def test_bad_arguments_fail_clearly():
    sae, score, reps, attrs = setup()
    items = concept_item_mask(attrs, [0])
    with pytest.raises(ValueError, match="mode"):
        ablate_latent(sae, reps, 0, score, items, mode="scale")
    with pytest.raises(ValueError, match="value"):
        ablate_latent(sae, reps, 0, score, items, mode="boost")
    with pytest.raises(ValueError, match="out of range"):
        ablate_latent(sae, reps, 99, score, items)


def test_window_exclusion_by_hand():
    mask = window_exclusion(torch.tensor([[0, 1, 2], [3, 3, 4]]), n_items=5)
    assert mask.tolist() == [
        [True, True, True, False, False, False],
        [True, False, False, True, True, False],
    ]


def latent(j: int, attr: int, max_fit: float, confident: bool = True) -> ConceptLatent:
    return ConceptLatent(latent=j, f1=0.9, precision=0.9, recall=0.9, f1_fit=0.9, baseline_f1=0.1,
                         confident=confident, n_active_heldout=10, concepts={f"attr{attr}": 2.0}, examples=[],
                         attrs=[attr], max_fit=max_fit)  # fmt: skip


def brute_force(sae, reps, windows, j, attr, attrs, score, mode, value, k=5):
    """Share of concept items in the top-k lists before and after editing latent j, one user at a time."""
    items = attrs[:, attr]
    before, after = [], []
    for u, win in zip(reps, windows, strict=True):
        z = sae.encode(u[None])[0]
        zj = 0.0 if mode == "zero" else max(float(z[j]), value)
        moved = u + (zj - float(z[j])) * sae.W_dec[j]
        for vec, out in ((u, before), (moved, after)):
            s = score(vec[None])[0].clone()
            s[win] = float("-inf")  # the history and the padding never appear in the list
            s[0] = float("-inf")
            out.append(items[s.topk(k).indices].float().mean().item())
    return torch.tensor(before), torch.tensor(after)


@torch.no_grad()
def test_concept_sweep_matches_brute_force_and_summarises():
    sae, score, reps, attrs = setup()
    g = torch.Generator().manual_seed(5)
    windows = torch.randint(0, 41, (300, 4), generator=g)
    rows = {"acts": reps, "window": windows}
    targets = [latent(5, 0, 3.0), latent(2, 1, 1.5, confident=False), latent(7, 0, 1.0)]
    sweep = ablate_concept_latents(sae, rows, score, attrs, targets, n_latents=2, n_users=200, top_k=5,
                                   boost_scale=2.0, keep_error=True, alpha=0.05)  # fmt: skip

    z = sae.encode(reps[:200])
    expected = []
    for t in targets[:2]:  # n_latents = 2: the third target is not ablated
        on = z[:, t.latent] > 0
        for mode, sel in (("zero", on), ("boost", ~on)):
            if not sel.any():
                continue
            b, a = brute_force(sae, reps[:200][sel], windows[:200][sel], t.latent, t.attrs[0], attrs, score, mode,
                               2.0 * t.max_fit)  # fmt: skip
            expected.append((t, mode, int(sel.sum()), b, a))
    assert [(r["latent"], r["mode"]) for r in sweep.runs] == [(t.latent, m) for t, m, *_ in expected]
    for run, (t, _mode, n, b, a) in zip(sweep.runs, expected, strict=True):
        assert run["n_users"] == n
        assert run["concept"] == f"attr{t.attrs[0]}" and run["confident"] == t.confident
        assert run["share_before"] == pytest.approx(b.mean().item(), abs=1e-6)
        assert run["share_after"] == pytest.approx(a.mean().item(), abs=1e-6)
        assert run["delta"] == pytest.approx((a - b).mean().item(), abs=1e-6)
        p = stats.ttest_rel(a.numpy(), b.numpy()).pvalue if bool((a != b).any()) else 1.0
        assert run["p_value"] == pytest.approx(float(p), rel=1e-4, abs=1e-12)
        assert "deltas" not in run
    for mode in ("zero", "boost"):
        group = [r for r in sweep.runs if r["mode"] == mode]
        assert sweep.metrics[f"{mode}_n"] == len(group)
        assert sweep.metrics[f"{mode}_mean_delta"] == pytest.approx(
            sum(r["delta"] for r in group) / len(group)
        )
        assert sweep.metrics[f"{mode}_n_significant"] == sum(r["significant"] for r in group)
    headers, table = sweep.table()
    assert len(table) == len(sweep.runs) and len(headers) == len(table[0]) == 9
    assert "top-5" in sweep.note() and "2.0×" in sweep.note()


@torch.no_grad()
def test_concept_sweep_skips_an_empty_mode_and_honours_act_scale(tmp_path):
    sae, score, reps, attrs = setup()
    windows = torch.zeros(300, 4, dtype=torch.long)
    on = sae.encode(reps)[:, 5] > 0
    assert on.sum() >= 2
    only_on = {"acts": reps[on], "window": windows[on]}  # latent 5 is active on every row: no boost
    kw = dict(n_latents=1, n_users=1000, top_k=5, boost_scale=2.0, keep_error=True, alpha=0.05)
    sweep = ablate_concept_latents(sae, only_on, score, attrs, [latent(5, 0, 3.0)], **kw)
    assert [r["mode"] for r in sweep.runs] == ["zero"] and set(sweep.metrics) == {
        "zero_mean_delta", "zero_n_significant", "zero_n"
    }  # fmt: skip
    assert sweep.plot(tmp_path / "ablation.png").exists()

    # a source storing u/s with act_scale s: the SAE sees u and the host scores in its own units
    full = ablate_concept_latents(
        sae, {"acts": reps, "window": windows}, score, attrs, [latent(5, 0, 3.0)], **kw
    )
    scaled = ablate_concept_latents(
        sae, {"acts": reps / 4, "window": windows}, lambda v: score(v * 4), attrs, [latent(5, 0, 3.0)],
        **kw, act_scale=4.0,
    )  # fmt: skip
    assert scaled.runs == full.runs
    assert ablate_concept_latents(sae, only_on, score, attrs, [], **kw).plot(tmp_path / "none.png") is None
