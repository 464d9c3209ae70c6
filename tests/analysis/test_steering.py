"""α-sweep steering: keyword judging by hand, perplexity against a plain HF forward, α = 0 against unsteered
generation (tiny random Llama), and a real sweep on the embedded SmolLM2 along a token's unembedding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support import save_tiny_causal_lm

from saelab.analysis.lens import final_norm, logit_lens
from saelab.analysis.steering import (
    continuation_nll,
    continuation_perplexity,
    keyword_pattern,
    keywords_from_tokens,
    mentions,
    steering_figure,
    steering_plot,
    steering_sweep,
    suggest_keywords,
)
from saelab.hosts.causal_lm import CausalLMHost
from saelab.sae import SAE, TopK

PROMPTS = ["The committee met on Tuesday to", "Stars fuse hydrogen"]


@pytest.fixture(scope="module")
def tiny_host(tmp_path_factory) -> CausalLMHost:
    return CausalLMHost(str(save_tiny_causal_lm(tmp_path_factory.mktemp("steer") / "llama", "llama")), hook=1)


def _sae(d_in: int = 32, d_sae: int = 16) -> SAE:
    return SAE(d_in, d_sae, TopK(4), seed=0).eval()


@pytest.mark.parametrize(
    "text, keywords, hit",
    [
        ("We walked along the Ocean.", ["ocean"], True),  # case-insensitive, punctuation after
        ("oceanic currents", ["ocean"], False),  # not inside a longer word
        ("the pacific-ocean view", ["ocean"], True),  # a hyphen is a boundary
        ("a wedding cake", ["cake", "bride"], True),  # any of the keywords
        ("wedding  CAKE!", ["wedding cake"], True),  # a phrase, any whitespace between its words
        ("I like c++ a lot", ["c++"], True),  # keywords ending in punctuation
        ("I like c+++", ["c++"], True),  # "+" is not a word character
        ("dogdogdog", ["dog"], False),
        ("", ["dog"], False),
        ("the U.S. economy", ["u.s."], True),
        ("a.b", ["a.b"], True),
        ("axb", ["a.b"], False),  # keywords are literal, not regexes
    ],
)
def test_keyword_matching(text, keywords, hit):
    assert mentions(text, keywords) is hit


def test_keywords_from_tokens_by_hand():
    tokens = [" Ocean", "ocean", " the", "The", " in", "...", "\ufffd", " Wedding!", "ab", "(dogs)", "_x_"]
    assert keywords_from_tokens(tokens) == ["Ocean", "Wedding", "dogs"]
    assert keywords_from_tokens(tokens, min_chars=2, stopwords=frozenset()) == [
        "Ocean", "the", "in", "Wedding", "ab", "dogs",
    ]  # fmt: skip


def test_keyword_pattern_needs_a_keyword():
    with pytest.raises(ValueError, match="at least one"):
        keyword_pattern(["", "  "])


def test_perplexity_equals_a_plain_hf_forward(tiny_host):
    """exp(mean NLL of the continuation tokens) with the prompt as context, by hand from HF logits, for one
    example; the batched, right-padded scoring of rows of different lengths gives the same."""
    host, tok = tiny_host, tiny_host.tokenizer
    conts = host.generate(PROMPTS, 7)
    prompt, cont = PROMPTS[0], conts[0]
    head = [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]
    tail = tok(cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logits = host.model(input_ids=ids).logits[0]  # (T, vocab)
    n = len(head)
    nll = F.cross_entropy(logits[n - 1 : -1], ids[0, n:])  # targets: the continuation tokens only
    got = continuation_perplexity(host, PROMPTS, conts)
    assert got[0].item() == pytest.approx(math.exp(nll.item()), rel=1e-4)
    alone = continuation_perplexity(host, PROMPTS[1:], conts[1:])
    assert got[1].item() == pytest.approx(alone[0].item(), rel=1e-4)
    nll_empty, n_tok = continuation_nll(host, [prompt], [""])
    assert math.isnan(nll_empty[0]) and n_tok[0] == 0


@pytest.mark.parametrize("greedy", [True, False])
def test_alpha_zero_is_unsteered_generation(tiny_host, greedy):
    host, sae = tiny_host, _sae()
    n_samples = 1 if greedy else 2
    res = steering_sweep(
        host, sae, [3, 5], [2.0], PROMPTS, ["the"], 6, n_samples=n_samples, seed=4, greedy=greedy
    )
    assert res.alphas == [0.0, 2.0]
    expected = []
    for s in range(n_samples):
        expected += host.generate(PROMPTS, 6, greedy=greedy, seed=4 + s)
    assert res.texts[(3, 0.0)] == res.texts[(5, 0.0)] == expected
    assert res.n.tolist() == [[2 * n_samples] * 2] * 2
    again = steering_sweep(
        host, sae, [3, 5], [2.0], PROMPTS, ["the"], 6, n_samples=n_samples, seed=4, greedy=greedy
    )
    assert again.texts == res.texts  # deterministic given the seed
    assert torch.equal(again.concept_rate, res.concept_rate)


def test_table_judge_and_plot(tiny_host, tmp_path):
    """A callable judge replaces keywords; the table holds one row per (latent, α) with rate = share of hits
    and perplexity = mean of the per-generation perplexities; the figure has both panels."""
    host, sae = tiny_host, _sae()

    def long_text(text: str) -> bool:
        return len(text) > 10

    res = steering_sweep(host, sae, [1], [-3.0, 3.0], PROMPTS, max_new_tokens=5, judge=long_text, greedy=True)
    assert res.concepts == {1: "long_text"}
    headers, rows = res.table()
    assert headers == ["latent", "alpha", "concept_rate", "perplexity", "n"]
    assert [r[:2] for r in rows] == [[1, -3.0], [1, 0.0], [1, 3.0]]
    for r, a in enumerate(res.alphas):
        texts, ppl = res.texts[(1, a)], res.perplexities[(1, a)]
        assert rows[r][2] == pytest.approx(sum(long_text(t) for t in texts) / len(texts))
        finite = [p for p in ppl if math.isfinite(p)]
        assert rows[r][3] == pytest.approx(sum(finite) / len(finite))
    fig = steering_figure(res)
    rate_ax, ppl_ax = fig.axes
    assert list(rate_ax.lines[0].get_xdata()) == [-3.0, 0.0, 3.0]
    assert ppl_ax.get_yscale() == "log"
    assert steering_plot(res, tmp_path / "sweep.png").stat().st_size > 0
    assert "concept" in str(res)


def test_sweep_errors_say_what_to_do(tiny_host):
    host, sae = tiny_host, _sae()
    with pytest.raises(ValueError, match="n_samples=1"):
        steering_sweep(host, sae, [0], [1.0], PROMPTS, ["x"], 3, n_samples=2, greedy=True)
    with pytest.raises(ValueError, match="no keywords for latent 2"):
        steering_sweep(host, sae, [2], [1.0], PROMPTS, {0: ["x"]}, 3, greedy=True)
    with pytest.raises(ValueError, match="judge must be"):
        steering_sweep(host, sae, [0], [1.0], PROMPTS, ["x"], 3, judge="llm", greedy=True)


def test_suggest_keywords_strips_and_filters(tiny_host):
    """Each suggestion is a lens token stripped of whitespace and punctuation, ≥ 3 characters, no duplicates."""
    host, sae = tiny_host, _sae()
    lens = logit_lens(sae, host, [0], k=30)
    words = suggest_keywords(sae, host, 0, k=30)
    stripped = [t.strip(" \t\n.,;:!?'\"()[]{}-_") for t in lens.promoted_tokens[0]]
    assert all(len(w) >= 3 and w == w.strip() for w in words)
    assert all(any(w == s or w in s for s in stripped) for w in words)
    assert len({w.lower() for w in words}) == len(words)


def test_steering_along_a_token_raises_its_rate_on_smollm2():
    """The embedded SmolLM2 at block 6, and an "SAE" whose latent 0 is the unembedding row of " ocean" read
    back through the final norm's gain (W_U[t] / g): its lens promotes " ocean", the suggested keyword is
    "ocean", and steering hard (α = 1000, ~10× the typical residual norm of ~100 there) makes continuations
    say it where the unsteered ones do not."""
    host = CausalLMHost("smollm2", hook=6)
    tok = host.tokenizer
    W_U, g = host.model.get_output_embeddings().weight.detach(), final_norm(host).weight.detach()
    t = tok(" ocean", add_special_tokens=False)["input_ids"][0]
    sae = SAE(576, 8, TopK(2), seed=0).eval()
    with torch.no_grad():
        sae.W_dec[0] = W_U[t] / g / (W_U[t] / g).norm()
    assert logit_lens(sae, host, [0], k=1).promoted_ids[0, 0] == t
    keywords = suggest_keywords(sae, host, 0)[:1]
    assert keywords == ["ocean"]
    prompts = ["I went to the store and", "My favourite thing is"]
    res = steering_sweep(host, sae, [0], [1000.0], prompts, {0: keywords}, max_new_tokens=8, greedy=True)
    print(f"\n{res}\n{res.texts}")
    rate = dict(zip(res.alphas, res.concept_rate[0].tolist()))
    assert rate[0.0] == 0.0 and rate[1000.0] == 1.0
    ppl = dict(zip(res.alphas, res.perplexity[0].tolist()))
    assert ppl[1000.0] > ppl[0.0]  # "ocean ocean ..." is far less likely under the clean model
