"""Logit lens against direct computations, and generation/steering on tiny causal LMs (and SmolLM2, slow)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from support import SENTENCES, save_tiny_causal_lm

from saelab.analysis.lens import final_norm, logit_lens, steer
from saelab.edit import LatentEdit
from saelab.hosts.causal_lm import CausalLMHost
from saelab.sae import SAE, TopK

PROMPT = "The committee met on Tuesday to"


def _tiny(path, arch: str = "llama"):
    """A tiny random causal LM whose final-norm gain is far from uniform (so folding it matters)."""
    from transformers import AutoModelForCausalLM

    save_tiny_causal_lm(path, arch, n_layers=3, hidden=32)
    model = AutoModelForCausalLM.from_pretrained(path)
    norm = final_norm(SimpleNamespace(model=model))
    with torch.no_grad():
        norm.weight.copy_(torch.rand(32, generator=torch.Generator().manual_seed(1)) * 3 + 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("lens") / "llama")


def _sae(d_in: int = 32, d_sae: int = 48) -> SAE:
    return SAE(d_in, d_sae, TopK(4), seed=0).eval()


def test_logit_lens_equals_direct_computation(tiny_llama):
    host = CausalLMHost(str(tiny_llama), hook=1)
    sae = _sae()
    W_U, g = host.model.lm_head.weight, host.model.model.norm.weight
    lens = logit_lens(sae, host, latents=[3, 0, 17], k=5, scale=2.0)
    raw = logit_lens(sae, host, latents=[3, 0, 17], k=5, scale=2.0, fold_norm=False)
    for r, j in enumerate([3, 0, 17]):
        for out, ref in [(lens, (sae.W_dec[j] / 2.0 * g) @ W_U.T), (raw, (sae.W_dec[j] / 2.0) @ W_U.T)]:
            top, bottom = ref.topk(5), (-ref).topk(5)
            assert out.promoted_ids[r].tolist() == top.indices.tolist()
            assert out.suppressed_ids[r].tolist() == bottom.indices.tolist()
            torch.testing.assert_close(out.promoted_logits[r], top.values, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out.suppressed_logits[r], -bottom.values, rtol=1e-5, atol=1e-6)
            assert out.promoted_tokens[r] == [host.tokenizer.decode([i]) for i in top.indices.tolist()]
    assert lens.norm_applied and not raw.norm_applied
    assert lens.promoted_ids.tolist() != raw.promoted_ids.tolist()  # the gain changes the reading
    everything = logit_lens(sae, host, k=5, batch_size=7)  # all latents, in chunks
    assert everything.latents == list(range(48))
    assert everything.promoted_ids[[3, 0, 17]].tolist() == lens.promoted_ids.tolist()
    rec = lens.record(0)
    assert rec["promoted"][0] == [
        lens.promoted_tokens[1][0],
        pytest.approx(float(lens.promoted_logits[1, 0])),
    ]
    assert "suppressed" in str(lens)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_logit_lens_is_the_final_norm_and_unembedding(tmp_path, arch):
    """Through the model's own final norm and head: norm(d) W_Uᵀ − norm(0) W_Uᵀ is the lens up to a positive
    factor per latent (the norm's 1/scale); this checks the gain (Gemma: 1 + w) and LayerNorm's centring."""
    host = CausalLMHost(str(_tiny(tmp_path / arch, arch)), hook=1)
    sae = _sae()
    lens = logit_lens(sae, host, latents=range(6), k=8)
    norm, head = final_norm(host), host.model.get_output_embeddings()
    with torch.no_grad():
        ref = head(norm(sae.W_dec[:6])) - head(norm(torch.zeros(1, 32)))  # (6, vocab)
    top = ref.topk(8)
    assert lens.promoted_ids.tolist() == top.indices.tolist()
    ratio = lens.promoted_logits / top.values  # (6, 8): one positive number per row
    assert (ratio > 0).all()
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=0)


def test_logit_lens_errors_say_what_to_do(tiny_llama):
    no_head = SimpleNamespace(model=torch.nn.Linear(32, 32), model_id="an-encoder", tokenizer=None)
    with pytest.raises(ValueError, match="needs a host with an unembedding"):
        logit_lens(_sae(), no_head)
    with pytest.raises(ValueError, match="needs an SAE on the residual stream"):
        logit_lens(_sae(d_in=16), CausalLMHost(str(tiny_llama), hook=1))


def test_generate_equals_hf_generate(tiny_llama):
    host = CausalLMHost(str(tiny_llama), hook=1)
    tok = host.tokenizer
    ids = torch.tensor([[tok.bos_token_id, *tok(PROMPT, add_special_tokens=False)["input_ids"]]])
    ref = host.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=host.pad_id,
    )
    assert host.generate(PROMPT, 8) == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    state = torch.get_rng_state()
    a, b = (
        host.generate([PROMPT, "Stars"], 6, greedy=False, seed=3),
        host.generate([PROMPT, "Stars"], 6, greedy=False, seed=3),
    )
    assert a == b and len(a) == 2
    assert torch.equal(torch.get_rng_state(), state)  # the seed does not leak into the caller's RNG
    with pytest.raises(ValueError, match="positions to None"):
        edit = LatentEdit(_sae(), [0], "add", 1.0)
        edit.positions = torch.ones(1, 3, dtype=torch.bool)
        host.generate(PROMPT, 4, edit=edit)


def test_steering_with_alpha_zero_changes_nothing(tiny_llama):
    host = CausalLMHost(str(tiny_llama), hook=1)
    sae = _sae()
    ids, att = host.prompt_ids(SENTENCES[:3])
    clean = host.logits(ids, att)
    with host.spliced(LatentEdit(sae, [5, 9], "add", 0.0, scale=0.5)):
        same = host.logits(ids, att)
    torch.testing.assert_close(same, clean, atol=0, rtol=0)
    for greedy in (True, False):
        unsteered, steered = steer(host, sae, 5, 0.0, PROMPT, 12, greedy=greedy, seed=1)
        assert steered == unsteered
    assert host.generate(SENTENCES[:2], 10, edit=LatentEdit(sae, [5], "add", 0.0)) == host.generate(
        SENTENCES[:2], 10
    )


def test_large_alpha_along_a_token_unembedding_makes_it_the_argmax(tiny_llama):
    """W_dec[j] = W_U[t] / g with t the longest unembedding row: once α·W_dec[j] dominates the residual, the
    final norm turns it into W_U[t] (up to scale) and W_U W_U[t] peaks at t, so every next token is t."""
    host = CausalLMHost(str(tiny_llama), hook=1)
    tok = host.tokenizer
    W_U, g = host.model.lm_head.weight.detach(), host.model.model.norm.weight.detach()
    t = int(W_U.norm(dim=-1).argmax())
    assert t not in tok.all_special_ids
    sae = _sae()
    with torch.no_grad():
        sae.W_dec[7] = W_U[t] / g
    ids, att = host.prompt_ids([PROMPT])
    assert (host.logits(ids, att).argmax(-1) != t).any()
    with host.spliced(LatentEdit(sae, [7], "add", 1e4)):
        assert (host.logits(ids, att).argmax(-1) == t).all()
    unsteered, steered = steer(host, sae, 7, 1e4, PROMPT, 6)
    assert steered == tok.decode([t] * 6) != unsteered  # every step edited, not only the prompt's forward
    assert logit_lens(sae, host, [7], k=1).promoted_ids[0, 0] == t


def test_edit_under_the_kv_cache_equals_a_full_recompute(tiny_llama):
    """Cached decoding under a clamp edit (one new position per step at the hook) scores each step as a full
    forward of the final sequence under the same edit does."""
    host = CausalLMHost(str(tiny_llama), hook=1)
    sae = _sae()
    edit = LatentEdit(sae, [0, 1, 2, 3], "clamp", 5.0)
    ids, att = host.prompt_ids([PROMPT])
    with host.spliced(edit):
        out = host.model.generate(
            input_ids=ids, attention_mask=att, max_new_tokens=6, do_sample=False, pad_token_id=host.pad_id,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        full = host.logits(out.sequences)
    n = ids.shape[1]
    step_logits = torch.stack(out.logits, 1)  # (1, 6, vocab)
    torch.testing.assert_close(step_logits, full[:, n - 1 : -1], rtol=1e-4, atol=1e-5)
    clean = host.logits(out.sequences)
    assert (clean[:, n - 1 : -1] - full[:, n - 1 : -1]).abs().max() > 1e-3  # the edit is live


@pytest.mark.slow
def test_smollm2_lens_and_steering():
    """On the embedded SmolLM2: a latent along a "wedding" direction at block 6 (mean activation on wedding
    sentences minus neutral ones, Turner et al. arXiv:2308.10248), its lens and a steered generation."""
    host = CausalLMHost("smollm2", hook=6)
    wedding = [
        "The bride and groom exchanged vows at the wedding ceremony.",
        "We danced all night at my sister's wedding reception.",
        "The wedding cake had five tiers and white roses.",
        "They sent out the wedding invitations to all their guests.",
    ]

    def mean_act(texts):
        ids, att = host.prompt_ids(texts)
        h = host.activations(ids, att)[:, 1:]  # leave out BOS, whose activation dwarfs the rest
        m = att[:, 1:, None].to(h)
        return (h * m).sum((0, 1)) / m.sum(), h[m[..., 0] > 0].norm(dim=-1).median()

    on, _ = mean_act(wedding)
    off, typical = mean_act(SENTENCES)
    sae = _sae(d_in=576, d_sae=16)
    with torch.no_grad():
        sae.W_dec[0] = (on - off) / (on - off).norm()
    lens = logit_lens(sae, host, [0], k=10)
    alpha = float(typical)  # one typical residual norm; 2-4x that degenerates into repetition
    unsteered, steered = steer(host, sae, 0, alpha, "I went up to my friend and said", 24)
    print(f"\n{lens}\nα = {alpha:.1f}\nunsteered: {unsteered!r}\nsteered:   {steered!r}")
    assert steered != unsteered
    assert any(w in steered for w in ("wedding", "bride", "groom", "cake", "vows"))
    assert steer(host, sae, 0, 0.0, "I went up to my friend and said", 24)[1] == unsteered
