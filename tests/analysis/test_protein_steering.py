"""The steering sweep on a toy masked LM whose output the steering latent decides, with a deterministic scorer.

The toy host: every token embeds to 0, the hook is an identity layer, and the head gives tryptophan (W) the
logit 200·h₀ and every other amino acid 0. Unsteered, sampling is uniform over the 20 amino acids; once a
clamp pushes h₀ to 1 or more, W has probability 1 in float32 and every sequence is all W. The SAE is the
identity (W_enc = W_dec = I, no biases, ReLU), so clamping latent 0 to v moves h₀ by v / act_scale.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from scipy.stats import fisher_exact
from torch import nn

from saelab.analysis.enrichment import count_contingency, enrichment
from saelab.analysis.protein_steering import (
    generate,
    steering_criteria,
    steering_figure,
    steering_metrics,
    steering_plot,
    steering_sweep,
    steering_table,
)
from saelab.hosts.masked_lm import AMINO_ACIDS, MaskedLMHost
from saelab.sae import SAE, ReLU

VOCAB = {"<cls>": 0, "<eos>": 1, "<pad>": 2, "<mask>": 3, "<unk>": 4} | {
    a: 5 + i for i, a in enumerate(AMINO_ACIDS)
}
D = 4


class ToyMLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=D)
        self.embed = nn.Embedding(len(VOCAB), D)
        self.layer = nn.Identity()  # the hook point
        self.head = nn.Linear(D, len(VOCAB))
        with torch.no_grad():
            self.embed.weight.zero_()
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.weight[VOCAB["W"], 0] = 200.0

    def forward(self, input_ids, attention_mask=None):
        return types.SimpleNamespace(logits=self.head(self.layer(self.embed(input_ids))))


@pytest.fixture(scope="module")
def host() -> MaskedLMHost:
    return MaskedLMHost(ToyMLM(), VOCAB, 0, 1, 2, 3, 4, hook="layer", max_residues=64, name="toy")


def identity_sae() -> SAE:
    sae = SAE(D, D, ReLU(), b_dec_init="zeros", seed=0).eval()
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(D))
        sae.W_dec.copy_(torch.eye(D))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def planted_enrichment():
    """100 residues; "toy" on 0..29, "other" on 50..79, "rare" on 40..41. Latent 0 fires exactly on "toy"
    (precision 1), latent 2 on 0..24 and 30..34 (precision 25/30), latent 1 on "other", latent 3 on 85..99."""
    labels = torch.zeros(100, 3, dtype=torch.bool)
    labels[:30, 0], labels[50:80, 1], labels[40:42, 2] = True, True, True
    codes = torch.zeros(100, D)
    codes[:30, 0] = 1.0
    codes[50:80, 1] = 1.0
    codes[:25, 2], codes[30:35, 2] = 1.0, 1.0
    codes[85:, 3] = 1.0
    return enrichment(count_contingency([(codes, labels)], [0.1], ["toy", "other", "rare"]))


def all_w(seq: str) -> bool:
    return set(seq) == {"W"}


SCORERS = {
    "toy": (all_w, lambda s: s.count("W") / len(s), "every residue W"),
    "rare": (all_w, lambda s: 0.0, "every residue W"),
    "absent": (all_w, lambda s: 0.0, "every residue W"),
}
MAX_ACT = torch.tensor([2.0, 1.0, 0.5, 0.7])
GEN = {"n": 6, "length": 8, "rounds": 3, "temperature": 1.0, "seed": 5}


def sweep(host, targets, **kw):
    args = dict(threshold_index=0, alpha=0.05, select="precision", min_support=20, n_latents=2, **GEN)
    args |= kw
    return steering_sweep(
        host,
        identity_sae(),
        planted_enrichment(),
        MAX_ACT,
        targets,
        [0.0, 1.0],
        act_scale=2.0,
        scorers=SCORERS,
        **args,
    )


def test_sweep_selects_enriched_latents_and_steers_toward_the_target(host):
    out = sweep(host, ["toy", "absent", "rare"])
    baseline = generate(host, GEN["n"], GEN["length"], GEN["rounds"], 1.0, GEN["seed"])  # unsteered, by hand
    e = out["toy"]
    assert e["latents"] == [0, 2]  # q < 0.05, ≥ 20 annotated active residues, by precision (1 > 25/30)
    assert e["max_activation"] == [2.0, 0.5]
    n_hits = sum(all_w(s) for s in baseline)
    assert e["baseline"]["successes"] == n_hits and e["baseline_examples"] == baseline[:3]
    assert e["baseline"]["mean_score"] == pytest.approx(np.mean([s.count("W") / 8 for s in baseline]))
    # c = 0 in clamp mode is the identity: the same seed gives the baseline's sequences
    assert e["steered"]["0"]["examples"] == baseline[:3] and e["steered"]["0"]["successes"] == n_hits
    # c = 1: latent 0 clamped to 1·2.0 in SAE units = 1.0 at the host (act_scale 2) → W logit 200 → all W
    one = e["steered"]["1"]
    assert one["successes"] == 6 and one["success_rate"] == 1.0 and one["mean_score"] == 1.0
    assert one["examples"] == ["W" * 8] * 3
    ref = fisher_exact([[6, 0], [n_hits, 6 - n_hits]], alternative="greater").pvalue
    assert one["p_vs_baseline"] == pytest.approx(ref)
    assert out["absent"] == {"skipped": "absent is not among the annotation labels"}
    assert out["rare"] == {"skipped": "no latent passes FDR 0.05 for rare", "latents": []}


def test_min_support_and_act_scale(host):
    e = sweep(host, ["toy"], min_support=26)["toy"]
    assert e["latents"] == [0]  # latent 2 has 25 annotated active residues
    # the same clamp at act_scale 400 moves h₀ by 2/400: W's logit 1, not enough to make every residue W
    sae = identity_sae().train()
    weak = steering_sweep(
        host, sae, planted_enrichment(), MAX_ACT, ["toy"], [1.0], threshold_index=0, alpha=0.05,
        select="precision", min_support=26, n_latents=1, act_scale=400.0, scorers=SCORERS, **GEN,
    )  # fmt: skip
    assert weak["toy"]["steered"]["1"]["successes"] < 6
    assert sae.training  # evaluated in eval mode, its own mode given back


def test_unknown_target_fails_before_generating(host):
    with pytest.raises(ValueError, match="no generation scorer for 'helix'"):
        sweep(host, ["toy", "helix"])


def test_table_metrics_criteria_and_plot(host, tmp_path):
    out = sweep(host, ["toy", "absent"])
    e = out["toy"]
    headers, rows = steering_table(out)
    assert headers[0] == "target" and len(rows) == 3  # two strengths, one skipped target
    assert rows[1][:4] == ["toy", "0,2", "1", f"6/6 ({1.0:.3g})"]
    assert rows[2] == ["absent", "-", "-", "-", "-", "absent is not among the annotation labels"]
    assert steering_metrics(out) == {
        "toy/success_rate/c=0": e["steered"]["0"]["success_rate"],
        "toy/success_rate/c=1": 1.0,
        "toy/success_rate/baseline": e["baseline"]["success_rate"],
    }
    assert steering_criteria(["toy", "nope"], SCORERS) == "toy: every residue W"
    assert steering_criteria(["transmembrane"]).startswith("transmembrane: 19-residue window")
    assert steering_plot(out, tmp_path / "s.png").exists()
    assert steering_plot({"absent": out["absent"]}, tmp_path / "none.png") is None


def test_plot_shows_the_scores_when_no_sequence_hits():
    """Without a single hit every rate bar has height 0; the plot still shows the table's hits/n and its
    mean scores (with the unsteered score marked), one column per steered target."""

    def run(k: int, score: float) -> dict:
        return {"successes": k, "n": 20, "success_rate": k / 20, "mean_score": score, "p_vs_baseline": 1.0}

    steering = {
        "zinc_finger": {
            "latents": [3],
            "baseline": run(0, 0.08),
            "steered": {"1": run(0, 0.11), "4": run(0, 0.17)},
        },
        "absent": {"skipped": "absent is not among the annotation labels"},
    }
    rate, score = steering_figure(steering).axes  # the skipped target has no column
    assert [p.get_height() for p in rate.patches] == [0.0, 0.0, 0.0]
    assert [t.get_text() for t in rate.texts] == ["0/20", "0/20", "0/20"]
    assert [p.get_height() for p in score.patches] == pytest.approx([0.08, 0.11, 0.17])
    assert [t.get_text() for t in score.texts] == ["0.08", "0.11", "0.17"]
    assert any(list(line.get_ydata()) == [0.08, 0.08] for line in score.get_lines())  # the unsteered score
    assert [t.get_text() for t in score.get_xticklabels()] == ["unsteered", "c=1", "c=4"]
    assert rate.get_title() == "zinc_finger" and rate.get_ylabel().startswith("success rate")
    assert score.get_ylabel() == "mean C+H fraction" and score.get_xlabel() == "clamp strength"
    assert steering_figure({"absent": steering["absent"]}) is None


def test_sweep_shows_progress_over_its_conditions(host, capsys):
    sweep(host, ["absent", "toy"])
    err = capsys.readouterr().err  # tqdm bars: one over the conditions, one over each one's host forwards
    assert "steering" in err and "toy c=1" in err and "forward" in err
