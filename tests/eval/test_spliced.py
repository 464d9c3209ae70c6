"""Spliced CE/KL metrics against hand computations, and tail-token coverage on a planted example."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support import save_tiny_causal_lm
from torch import nn

from saelab.analysis.coverage import captured_types, coverage_by_frequency, sae_coverage, token_counts
from saelab.eval.base import EvalResult
from saelab.eval.spliced import ce_loss_score, kl_score, ppl_vs_l0, ppl_vs_l0_figure, spliced_metrics
from saelab.hosts.causal_lm import CausalLMHost
from saelab.types import SAEOutput


class Fn(nn.Module):
    """A stand-in "SAE" whose reconstruction is fn(x)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn, self.dummy = fn, nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return SAEOutput(x=x, x_hat=self.fn(x), pre_acts=x, dense=x)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    path = save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "llama", "llama", n_layers=3, hidden=32)
    return CausalLMHost(str(path), hook=1, d_in=32)


def test_scores_by_hand():
    assert ce_loss_score(2.0, 3.0, 4.0) == pytest.approx(0.5)
    assert ce_loss_score(2.0, 2.0, 4.0) == pytest.approx(1.0)
    assert ce_loss_score(2.0, 4.0, 4.0) == pytest.approx(0.0)
    assert math.isnan(ce_loss_score(2.0, 3.0, 2.0))
    assert kl_score(0.25, 1.0) == pytest.approx(0.75)


def _batch(host):
    tok = host.tokenizer
    texts = ["Photons carry momentum but no rest mass.", "The council approved the budget."]
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    T = max(map(len, enc)) + 1
    ids = torch.full((2, T), tok.eos_token_id)
    att = torch.zeros(2, T, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, 0], ids[i, 1 : 1 + len(e)], att[i, : 1 + len(e)] = 1, torch.tensor(e), 1
    mask = att.bool().clone()
    mask[:, 0] = False  # BOS keeps its activation
    return ids, att, mask


def _hand_ce_kl(host, ids, att, mask, fn):
    """CE and KL computed independently: an explicit forward hook, F.cross_entropy with ignore_index, F.kl_div."""
    clean = host.model(input_ids=ids, attention_mask=att).logits

    def hook(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        new = torch.where(mask[..., None], fn(h), h)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = host.model.model.layers[1].register_forward_hook(hook)
    try:
        new = host.model(input_ids=ids, attention_mask=att).logits
    finally:
        handle.remove()
    tgt = ids[:, 1:].masked_fill(att[:, 1:] == 0, -100)
    ce = F.cross_entropy(new[:, :-1].reshape(-1, new.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    ce_clean = F.cross_entropy(clean[:, :-1].reshape(-1, new.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    kl_tok = F.kl_div(
        F.log_softmax(new[:, :-1], -1), F.log_softmax(clean[:, :-1], -1), log_target=True, reduction="none"
    )
    valid = att[:, 1:].bool()
    kl = kl_tok.sum(-1)[valid].mean()
    return float(ce_clean), float(ce), float(kl)


def test_spliced_metrics_match_hand_computation(host):
    ids, att, mask = _batch(host)
    half = Fn(lambda x: 0.5 * x)
    ident = Fn(lambda x: x)
    res = spliced_metrics(host, {"half": half, "id": ident}, ids, att, mask, batch_size=1)
    with torch.no_grad():
        ce_clean, ce_half, kl_half = _hand_ce_kl(host, ids, att, mask, lambda h: 0.5 * h)
        _, ce_zero, kl_zero = _hand_ce_kl(host, ids, att, mask, torch.zeros_like)
    r = res["half"]
    assert r["n_tokens"] == int(att[:, 1:].sum())
    assert r["ce_clean"] == pytest.approx(ce_clean, rel=1e-5)
    assert r["ce_sae"] == pytest.approx(ce_half, rel=1e-5)
    assert r["ce_zero"] == pytest.approx(ce_zero, rel=1e-5)
    assert r["kl_sae"] == pytest.approx(kl_half, rel=1e-4, abs=1e-7)
    assert r["kl_zero"] == pytest.approx(kl_zero, rel=1e-4)
    assert r["ce_loss_score"] == pytest.approx((ce_zero - ce_half) / (ce_zero - ce_clean), rel=1e-4)
    assert r["kl_score"] == pytest.approx((kl_zero - kl_half) / kl_zero, rel=1e-4)
    assert r["spliced_ppl"] == pytest.approx(math.exp(ce_half), rel=1e-5)
    # the identity "SAE" leaves the loss unchanged: score 1, KL 0
    assert res["id"]["ce_sae"] == pytest.approx(ce_clean, rel=1e-6)
    assert res["id"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert res["id"]["kl_sae"] == pytest.approx(0.0, abs=1e-6)


def test_reference_cache_reuses_clean_and_zero(host, monkeypatch):
    """A second SAE on the same contexts with the kept reference: the same numbers from one forward per batch."""
    ids, att, mask = _batch(host)
    half, third = Fn(lambda x: 0.5 * x), Fn(lambda x: x / 3)
    plain = spliced_metrics(host, {"half": half, "third": third}, ids, att, mask, batch_size=1)
    ref: dict = {}
    first = spliced_metrics(host, {"half": half}, ids, att, mask, batch_size=1, reference=ref)["half"]
    calls = []
    forward = host.logits
    monkeypatch.setattr(host, "logits", lambda *a: calls.append(1) or forward(*a))
    second = spliced_metrics(host, {"third": third}, ids, att, mask, batch_size=1, reference=ref)["third"]
    assert len(calls) == 2  # two batches, one spliced forward each; clean and zero came from the reference
    for key in ("ce_clean", "ce_zero", "kl_zero"):
        assert first[key] == second[key] == pytest.approx(plain["half"][key], rel=1e-6)
    for key in ("ce_sae", "kl_sae", "ce_loss_score"):
        assert second[key] == pytest.approx(plain["third"][key], rel=1e-6)
        assert first[key] == pytest.approx(plain["half"][key], rel=1e-6)


def test_masked_positions_keep_their_activation(host):
    ids, att, _ = _batch(host)
    nothing = torch.zeros_like(att, dtype=torch.bool)
    res = spliced_metrics(host, {"zero": Fn(torch.zeros_like)}, ids, att, nothing)["zero"]
    assert res["ce_sae"] == pytest.approx(res["ce_clean"], rel=1e-6)
    assert res["ce_zero"] == pytest.approx(res["ce_clean"], rel=1e-6)


def test_coverage_planted_example():
    """Type 5 has a dedicated latent; type 7's latent fires on too few of its tokens; type 9 only on a broad latent."""
    ids = torch.tensor([5, 5, 5, 5, 7, 7, 7, 7, 9, 9, 3, 3])
    codes = torch.zeros(12, 4)
    codes[0:4, 0] = 2.0  # latent 0: every occurrence of 5, all of its mass → captures 5
    codes[4, 1] = 1.0  # latent 1: one of four 7s (recall 0.25 < 0.5) → 7 not captured
    # latent 2 fires everywhere, mass 5s: 8, 7s: 0.4, 9s: 2, 3s: 2 (of 12.4): 9 holds 0.161 < 0.2, 7 only 0.032
    codes[:, 2] = torch.tensor([2.0] * 4 + [0.1] * 4 + [1.0] * 4)
    codes[10:12, 3] = 1.0  # latent 3: exactly the 3s → captured, but ...
    codes[0:10, 3] = 0.0
    types, counts, cap = captured_types([(codes[:6], ids[:6]), (codes[6:], ids[6:])], 0.5, 0.2, min_count=2)
    assert types.tolist() == [3, 5, 7, 9] and counts.tolist() == [2, 4, 4, 2]
    assert cap.tolist() == [True, True, False, False]
    # ... with min_count=3, the twice-seen 3 no longer counts
    assert captured_types([(codes, ids)], 0.5, 0.2, min_count=3)[2].tolist() == [False, True, False, False]
    # latent 2 captures 9 once the purity bar drops below 2/12.4; 7 stays out
    assert captured_types([(codes, ids)], 0.5, 0.15, min_count=2)[2].tolist() == [True, True, False, True]

    corpus = torch.tensor([5] * 3 + [7] * 50 + [9] * 500)  # corpus counts: 3→0, 5→3, 7→50, 9→500
    cnt = token_counts(corpus, 16)
    cov = coverage_by_frequency(types, counts, cap, cnt, edges=(0, 1, 10, 100, 1000))
    assert cov.bin_labels == ["0", "1–9", "10–99", "100–999", "≥1000"]
    assert cov.bin_tokens == [2, 4, 4, 2, 0]
    assert cov.bin_coverage[:4] == [1.0, 1.0, 0.0, 0.0] and math.isnan(cov.bin_coverage[4])
    assert cov.total_coverage == pytest.approx(6 / 12)
    # cumulative curve, least frequent first: the 6 covered tokens are the first 6 of 12
    assert cov.cum_x[-1] == pytest.approx(1.0) and cov.cum_y[-1] == pytest.approx(1.0)
    assert dict(zip(cov.cum_x, cov.cum_y, strict=True))[0.5] == pytest.approx(1.0)


def test_sae_coverage_runs_the_sae():
    lin = Fn(lambda x: x.relu())
    acts = torch.zeros(6, 3)
    acts[0:3, 0] = 1.0
    acts[3:6, 1] = 1.0
    batches = [{"acts": acts, "token_ids": torch.tensor([4, 4, 4, 6, 6, 8])}]
    cov = sae_coverage(lin, batches, token_counts(torch.tensor([4, 6, 6]), 10), 0.5, 0.5, 1, edges=(0, 1, 2))
    assert cov.bin_tokens == [1, 3, 2]  # 8 unseen, 4 once, 6 twice
    # latent 1 fires on 6, 6, 8: 6 holds 2/3 ≥ 0.5 of its mass (captured), 8 only 1/3 (not)
    assert cov.bin_coverage == [0.0, 1.0, 1.0]


def test_ppl_vs_l0_joins_each_sae_point_to_its_k_sweep():
    r = EvalResult(
        metrics={"l0": 32.0, "spliced_ppl": 60.0},
        data={
            "l0_at_k": [
                {"k": 64, "l0": 64.0, "spliced_ppl": 50.0},
                {"k": 16, "l0": 16.0, "spliced_ppl": 80.0},
            ]
        },
    )
    assert ppl_vs_l0({"general": r}) == {
        "general": [
            {"l0": 16.0, "spliced_ppl": 80.0},
            {"l0": 32.0, "spliced_ppl": 60.0},
            {"l0": 64.0, "spliced_ppl": 50.0},
        ]
    }
    assert ppl_vs_l0({"g": EvalResult(metrics={"l0": 8.0, "spliced_ppl": 9.0})}) == {
        "g": [{"l0": 8.0, "spliced_ppl": 9.0}]
    }


def test_ppl_vs_l0_plot_marks_the_clean_perplexity():
    curves = {"general": [{"l0": 16.0, "spliced_ppl": 80.0}, {"l0": 32.0, "spliced_ppl": 60.0}]}
    (ax,) = ppl_vs_l0_figure(curves, clean_ppl=37.3).axes
    curve, clean = ax.get_lines()
    assert list(curve.get_xdata()) == [16.0, 32.0] and list(curve.get_ydata()) == [80.0, 60.0]
    assert list(clean.get_ydata()) == [37.3, 37.3] and clean.get_label().startswith("clean model")
    assert ax.get_ylim()[0] < 37.3  # the line is inside the plot
    assert ax.get_xlabel().startswith("L0") and ax.get_ylabel() and ax.get_title()
    (ax,) = ppl_vs_l0_figure(curves, clean_ppl=None).axes  # no clean reference: the curves alone
    assert len(ax.get_lines()) == 1
