"""SCR and TPP (SAEBench) against values worked out by hand on toy cases."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.eval.scr import accuracy, latent_effects, scr_curve, scr_score, top_latents, tpp_score


def test_latent_effects_by_hand():
    # two latents; decoder rows e0 and e1; probe w = (2, -1)
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    w = torch.tensor([2.0, -1.0])
    pos = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 2.0]])  # means 2, 1, 1
    neg = torch.tensor([[0.0, 3.0, 1.0], [0.0, 1.0, 1.0]])  # means 0, 2, 1
    # (μ⁺ − μ⁻) = (2, −1, 0); w · d = (2, −1, 1) → effects (4, 1, 0)
    assert torch.equal(latent_effects(pos, neg, w, W_dec), torch.tensor([4.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="both classes"):
        latent_effects(pos[:0], neg, w, W_dec)


def test_top_latents_abs_and_positive():
    e = torch.tensor([0.5, -3.0, 2.0, -0.1, 2.0])
    assert top_latents(e, 3) == [1, 2, 4]  # |e|, ties by index
    assert top_latents(e, 3, "positive") == [2, 4, 0]
    assert top_latents(torch.tensor([-1.0, 0.0, 0.3]), 3, "positive") == [2]  # never a non-positive one


def test_scr_score_by_hand():
    # base 0.60, oracle 0.90: ablation to 0.75 recovers half the gap; to 0.55 harms
    assert scr_score(0.75, 0.60, 0.90) == pytest.approx(0.5)
    assert scr_score(0.90, 0.60, 0.90) == pytest.approx(1.0)
    assert scr_score(0.55, 0.60, 0.90) == pytest.approx(-1 / 6)
    assert math.isnan(scr_score(0.7, 0.8, 0.8))
    assert scr_curve({2: 0.66, 5: 0.75, 7: 0.8}, 0.6, 0.9) == pytest.approx({2: 0.2, 5: 0.5})


def test_tpp_by_hand():
    clean = {"a": 0.9, "b": 0.8, "c": 0.7}
    ablated = {  # row: whose latents were ablated; column: which probe
        "a": {"a": 0.5, "b": 0.8, "c": 0.6},  # own drop 0.4, others 0.0 and 0.1 → 0.35
        "b": {"a": 0.9, "b": 0.8, "c": 0.7},  # nothing moves → 0
        "c": {"a": 0.7, "b": 0.6, "c": 0.6},  # own 0.1, others 0.2 and 0.2 → −0.1
    }
    total, per = tpp_score(clean, ablated)
    assert per == pytest.approx({"a": 0.35, "b": 0.0, "c": -0.1})
    assert total == pytest.approx(0.25 / 3)
    with pytest.raises(ValueError, match="two or more"):
        tpp_score({"a": 1.0}, {"a": {"a": 1.0}})


def test_accuracy():
    assert accuracy(torch.tensor([1.0, -2.0, 0.5, -0.1]), torch.tensor([1, 0, 0, 0])) == 0.75


def test_scr_evaluator_matches_the_shift_functions_on_a_tiny_host(tmp_path):
    """The evaluator on a tiny offline LM and the real offline biographies: its SCR(N) equals the same steps
    done by hand with saelab.analysis.shift, and the host part is computed once for two SAEs."""
    from types import SimpleNamespace

    from support import save_tiny_causal_lm

    from saelab.analysis.shift import ablate, pool
    from saelab.eval.scr import SCR
    from saelab.hosts.causal_lm import CausalLMHost
    from saelab.sae import SAE, TopK

    host = CausalLMHost(
        str(save_tiny_causal_lm(tmp_path / "lm", "llama", n_layers=2, hidden=32)), hook=1, d_in=32
    )
    source = SimpleNamespace(host=host, act_scale=1.0)
    ev = SCR(ns=(2, 5), others_max_docs=60)
    assert ev.applies_to(source) is None and ev.applies_to(SimpleNamespace()) is not None
    sae = SAE(32, 64, TopK(4), seed=0).eval()
    got = ev(sae, source, tmp_path).metrics
    part = ev.host_part(host)
    codes = {n: pool(part["docs"][n], sae).codes for n in ("balanced", "others")}
    g = part["g"]["others"]
    eff = latent_effects(codes["others"][g == 1], codes["others"][g == 0], part["gender_probe"].w, sae.W_dec)
    for n in (2, 5):
        x = ablate(part["acts"]["balanced"], codes["balanced"], sae, top_latents(eff, n))
        acc = part["probe"].accuracy(x, part["y"]["balanced"])
        ref = scr_score(acc, part["base"], part["oracle"])
        assert got[f"scr_{n}"] == pytest.approx(ref, nan_ok=True)
    assert 0.0 <= got["scr_base_acc"] <= 1.0 and 0.0 <= got["scr_oracle_acc"] <= 1.0
    ev(SAE(32, 64, TopK(4), seed=1).eval(), source, tmp_path)
    assert len(ev._memo) == 1  # one host part for both SAEs


def test_tpp_evaluator_matches_the_functions_on_a_tiny_host(tmp_path):
    from types import SimpleNamespace

    from support import save_tiny_causal_lm

    from saelab.analysis.shift import ablate, pool
    from saelab.eval.scr import TPP
    from saelab.hosts.causal_lm import CausalLMHost
    from saelab.sae import SAE, TopK

    host = CausalLMHost(
        str(save_tiny_causal_lm(tmp_path / "lm", "llama", n_layers=2, hidden=32)), hook=1, d_in=32
    )
    source = SimpleNamespace(host=host, act_scale=1.0)
    ev = TPP(ns=(2, 5), max_docs_per_class=16)
    sae = SAE(32, 64, TopK(4), seed=0).eval()
    got = ev(sae, source, tmp_path).metrics
    part = ev.host_part(host)
    assert len(part["probes"]) == 5  # the offline stand-in's five professions
    codes = pool(part["docs"], sae).codes
    test, y, probes = part["test"], part["y"], part["probes"]
    for n in (2, 5):
        ablated = {}
        for i in probes:
            eff = latent_effects(
                codes[~test & (y[i] == 1)], codes[~test & (y[i] == 0)], probes[i].w, sae.W_dec
            )
            x = ablate(part["acts"][test], codes[test], sae, top_latents(eff, n, "positive"))
            ablated[i] = {j: probes[j].accuracy(x, y[j][test]) for j in probes}
        assert got[f"tpp_{n}"] == pytest.approx(tpp_score(part["clean"], ablated)[0])
