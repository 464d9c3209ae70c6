"""SHIFT on document-level probes: the closed-form attribution against autograd and finite differences,
ablating no latent changes nothing, and on synthetic documents with a gender direction carried by known
latents SHIFT picks exactly those latents and removes gender from the probe while profession stays."""

from __future__ import annotations

import torch

from saelab.analysis.shift import ablate, attribution, group_accuracy, latent_top_tokens, pool, train_probe
from saelab.edit import LatentEdit
from saelab.eval.scr import latent_effects, top_latents
from saelab.sae import SAE, ReLU

D = 8
E = torch.eye(D)


def planted_sae() -> SAE:
    """Latent 0 reads/writes e0 (profession), latents 1 and 2 split the gender direction e1 (positive and
    negative sides), latents 3..7 the noise dimensions e3..e7."""
    rows = [E[0], E[1], -E[1], *E[3:]]
    sae = SAE(D, len(rows), ReLU(), apply_b_dec_to_input=False, b_dec_init="zeros").eval()
    with torch.no_grad():
        W = torch.stack(rows)
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.t())
        sae.b_enc.zero_()
    return sae


def documents(prof: torch.Tensor, gender: torch.Tensor, seed: int, length: int = 6) -> list[torch.Tensor]:
    """Per document `length` positions: ±1 on e0 by profession, ±1 on e1 by gender, noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for p, s in zip(prof.tolist(), gender.tolist(), strict=True):
        h = 0.4 * torch.randn(length, D, generator=g)
        h[:, 0] += 0.6 if p else -0.6  # profession: present but weaker than gender
        h[:, 1] += 1.5 if s else -1.5  # gender: the strong, easy signal
        h[:, 2] = 0.0
        docs.append(h)
    return docs


def test_attribution_equals_autograd_and_finite_differences():
    torch.manual_seed(0)
    sae = planted_sae()
    docs = [torch.randn(5, D), torch.randn(3, D)]
    w, b = torch.randn(D), 0.3

    def logit_sum(scale: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(())
        for h in docs:
            a = sae(h).codes
            err = h - sae.decode(a)
            h_hat = (a * scale) @ sae.W_dec + sae.b_dec + err  # the splice, latents scaled
            total = total + h_hat.mean(0) @ w + b
        return total

    closed = attribution(pool(docs, sae).codes, sae.W_dec, w)
    # autograd: d(logit)/d(scale_j) at scale 1 = Σ_docs Σ_t a_tj ∂logit/∂a_tj (activation × gradient)
    scale = torch.ones(sae.d_sae, requires_grad=True)
    (grad,) = torch.autograd.grad(logit_sum(scale), scale)
    torch.testing.assert_close(closed, grad.detach(), rtol=1e-5, atol=1e-6)
    eps = 1e-3
    with torch.no_grad():
        fd = torch.stack(
            [
                (logit_sum(1 + eps * E_j) - logit_sum(1 - eps * E_j)) / (2 * eps)
                for E_j in torch.eye(sae.d_sae)
            ]
        )
    torch.testing.assert_close(closed, fd, rtol=1e-3, atol=1e-4)


def test_ablating_no_latent_changes_nothing():
    sae = planted_sae()
    docs = documents(torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1]), seed=1)
    p = pool(docs, sae)
    assert torch.equal(ablate(p.acts, p.codes, sae, []), p.acts)


def test_pooled_ablation_is_the_pooled_splice_edit():
    """ablate on pooled codes = mean over positions of the zero edit spliced at every position (act scale s)."""
    sae = SAE(D, 12, ReLU(), seed=3).eval()
    docs = documents(torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1]), seed=2)
    s, latents = 1.7, [0, 4, 9]
    p = pool(docs, sae, act_scale=s)
    spliced = torch.stack([LatentEdit(sae, latents, "zero", scale=s)(d).mean(0) for d in docs])
    torch.testing.assert_close(ablate(p.acts, p.codes, sae, latents), spliced, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(spliced, p.acts)


def test_shift_selects_the_planted_gender_latents_and_removes_gender():
    sae = planted_sae()
    n = 80
    # ambiguous training set: profession 1 ⇔ gender 1
    y_amb = torch.arange(n) % 2
    amb = pool(documents(y_amb, y_amb, seed=2), sae)
    # balanced test set: all four groups, 20 each
    prof_bal = torch.tensor([0, 0, 1, 1] * (n // 4))
    gen_bal = torch.tensor([0, 1, 0, 1] * (n // 4))
    bal = pool(documents(prof_bal, gen_bal, seed=3), sae)
    # gender probe on other documents where profession and gender are independent
    prof_o, gen_o = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(4)), torch.arange(n) % 2
    other = pool(documents(prof_o, gen_o, seed=5), sae)
    gender_probe = train_probe(other.acts, gen_o)

    names_p = ["b" if p else "a" for p in prof_bal.tolist()]
    names_g = ["f" if s else "m" for s in gen_bal.tolist()]
    probe = train_probe(amb.acts, y_amb)
    before = group_accuracy(probe.logits(bal.acts), names_p, names_g, "b")
    # the biased probe leans on gender: a group where gender disagrees with profession is below chance
    assert before["worst_group"] < 0.5

    effects = latent_effects(other.codes[gen_o == 1], other.codes[gen_o == 0], gender_probe.w, sae.W_dec)
    chosen = top_latents(effects, 2)
    assert sorted(chosen) == [1, 2]  # the planted gender latents

    # ablated through the splice, then the probe retrained on the ablated ambiguous set (SHIFT + retrain)
    amb_abl = ablate(amb.acts, amb.codes, sae, chosen)
    bal_abl = ablate(bal.acts, bal.codes, sae, chosen)
    retrained = train_probe(amb_abl, y_amb)
    after = group_accuracy(retrained.logits(bal_abl), names_p, names_g, "b")
    assert after["worst_group"] > 0.8 and after["accuracy"] > 0.85
    # gender is gone from the ablated activations: a gender probe on them is at chance on the balanced set
    g_after = train_probe(bal_abl[: n // 2], gen_bal[: n // 2]).accuracy(bal_abl[n // 2 :], gen_bal[n // 2 :])
    assert g_after < 0.7


def test_latent_top_tokens_ranks_distinct_tokens_by_activation():
    sae = planted_sae()
    # two documents; latent 1 (+e1) fires 3.0 on token 11, 2.0 on token 12 and again 1.0 on token 11
    d1 = torch.zeros(3, D)
    d1[:, 1] = torch.tensor([1.0, 3.0, -1.0])
    d2 = torch.zeros(2, D)
    d2[:, 1] = torch.tensor([2.0, 0.5])
    tokens = [[11, 11, 13], [12, 14]]
    out = latent_top_tokens(sae, [d1, d2], tokens, [1, 2], decode=str, n=3)
    assert out[1] == ["11", "12", "14"]  # 11 once (its best, 3.0), then 12 (2.0), then 14 (0.5)
    assert out[2] == ["13"]  # latent 2 (−e1) fires only where e1 < 0
