"""The `absorption` evaluator: first-letter absorption on hand-built tensors with a known answer, the word
filter on a hand-made vocabulary, the host path on a tiny offline LM, the ground truth on the synthetic
source, and the two bad-input messages."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from support import SENTENCES, save_tiny_causal_lm

from saelab.analysis.absorption import synthetic_absorption
from saelab.data.synthetic import SyntheticDataModule
from saelab.data.text import TextActivations
from saelab.eval.absorption import (
    Absorption,
    LetterProbe,
    first_letter_absorption,
    pick_words,
    prompt_tokens,
    shared_prefix_len,
    split_words,
    train_letter_probe,
    vocabulary_words,
    word_activations,
)
from saelab.eval.base import evaluate
from saelab.hosts.causal_lm import CausalLMHost
from saelab.sae import SAE, ReLU, TopK

# ---------------------------------------------------------------------------------------------- hand-built
D_IN = 8
E = torch.eye(D_IN)  # e0: letter a, e1: letter b, e2: what switches the absorbing latent on, e3..: noise


def planted_words(seed: int = 0):
    """30 train + 6 test words per letter; test words 4 and 5 of letter a carry e2 (fully / partly absorbed)."""
    g = torch.Generator().manual_seed(seed)
    acts, labels, test = [], [], []
    for letter in (0, 1):
        for i in range(36):
            x = torch.zeros(D_IN)
            x[3:] = 0.3 * torch.randn(D_IN - 3, generator=g)  # dimensions no latent reads
            is_test = i >= 30
            x[letter] = 1.0 if is_test else 0.8 + 0.4 * torch.rand((), generator=g)
            if letter == 0 and i == 34:
                x[2] = 1.0  # full absorption
            if letter == 0 and i == 35:
                x[2] = 0.3  # partial absorption
            acts.append(x)
            labels.append(letter)
            test.append(is_test)
    return torch.stack(acts), torch.tensor(labels), torch.tensor(test)


def planted_sae(absorbing: bool = True) -> SAE:
    """Latent 0 = letter a (silenced by e2), latent 1 = letter b, latent 2 fires on e2.

    With `absorbing`, latent 2's decoder row is (e0 + e2)/√2 (cos 1/√2 with the letter-a probe), so it
    carries letter a wherever it replaces latent 0; without, its row is e2 (cos 0).
    """
    sae = SAE(D_IN, 3, ReLU(), apply_b_dec_to_input=False, b_dec_init="zeros").eval()
    with torch.no_grad():
        sae.W_enc.copy_(torch.stack([E[0] - 2 * E[2], E[1], 3 * E[2]], dim=1))  # (d_in, d_sae)
        sae.b_enc.zero_()
        dec2 = (E[0] + E[2]) / math.sqrt(2) if absorbing else E[2]
        sae.W_dec.copy_(torch.stack([E[0], E[1], dec2]))
    return sae


PROBE = LetterProbe(weight=torch.stack([E[0], E[1]]), bias=torch.tensor([-0.5, -0.5]))


@pytest.mark.parametrize("ranking", ["l1_probe", "mean_diff"])
def test_planted_absorbing_latent_is_found_on_exactly_its_words(ranking):
    acts, labels, is_test = planted_words()
    res = first_letter_absorption(
        acts, labels, is_test, PROBE, planted_sae(), max_k=3, latent_ranking=ranking
    )
    assert [e["main_latents"] for e in res.per_letter] == [[0], [1]]
    full_word, partial_word = 34, 35
    # full: latent 0 silent (1 − 2 < 0), latent 2 carries π = 3/√2 of P = 1 → fraction 1, full absorption
    assert res.fraction[full_word] == pytest.approx(1.0) and res.full[full_word]
    # partial: M = π_0 = 1 − 0.6 = 0.4, A = π_2 = 0.9/√2 ≥ 0.4·P, absorbed = min(A, P − M) = 0.6 → 0.6 / (0.6 + 0.4)
    assert res.fraction[partial_word] == pytest.approx(0.6, abs=1e-5) and not res.full[partial_word]
    scored = is_test.clone()
    scored[[full_word, partial_word]] = False
    assert torch.all(res.fraction[scored] == 0) and not res.full[scored].any()
    assert torch.isnan(res.fraction[~is_test]).all()  # train words are not scored
    a, b = res.per_letter
    assert a["n_probe_true_positives"] == 6 and b["n_probe_true_positives"] == 6
    assert a["mean_absorption_fraction"] == pytest.approx(1.6 / 6, abs=1e-6)
    assert a["full_absorption_rate"] == pytest.approx(1 / 6) and a["n_full_absorption"] == 1
    assert b["mean_absorption_fraction"] == 0 and b["full_absorption_rate"] == 0
    assert res.mean_absorption_fraction == pytest.approx(1.6 / 12, abs=1e-6)
    assert res.mean_full_absorption == pytest.approx(1 / 12)
    assert res.mean_num_split_features == 1


def test_no_absorbing_latent_scores_zero():
    acts, labels, is_test = planted_words()
    res = first_letter_absorption(acts, labels, is_test, PROBE, planted_sae(absorbing=False), max_k=3)
    assert res.mean_absorption_fraction == 0 and res.mean_full_absorption == 0
    assert not res.full.any()


def test_the_sae_reads_scaled_activations_and_the_fractions_do_not_change():
    acts, labels, is_test = planted_words()
    sae, seen = planted_sae(), []
    sae.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    # zero biases and ReLU: codes scale with s, and so does P, so the fractions are those at s = 1
    res = first_letter_absorption(acts, labels, is_test, PROBE, sae, act_scale=4.0, max_k=3)
    assert torch.allclose(torch.cat(seen), 4 * acts)
    assert res.fraction[35] == pytest.approx(0.6, abs=1e-5) and res.full[34]


def test_letter_probe_separates_planted_letters():
    acts, labels, _ = planted_words()
    probe = train_letter_probe(acts, labels, 2)
    assert ((probe.logits(acts).argmax(1)) == labels).all()
    cos = torch.nn.functional.cosine_similarity(probe.weight, torch.stack([E[0] - E[1], E[1] - E[0]]))
    assert (cos > 0.9).all()  # one-vs-rest on two letters: each probe points from the other letter to its own


# ---------------------------------------------------------------------------------------------- word filter
class StubTokenizer:
    """Greedy longest-match tokenizer over a hand-made vocabulary; `split=True` uses single characters only."""

    CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

    def __init__(self, pieces: list[str], split: bool = False) -> None:
        self.pieces = list(dict.fromkeys(self.CHARS + pieces))
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.split, self.all_special_ids = split, []

    def get_vocab(self) -> dict[str, int]:
        return dict(self.ids)

    def batch_decode(self, seqs):
        return ["".join(self.pieces[i] for i in s) for s in seqs]

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def _encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            n = (
                1
                if self.split
                else max(n for n in range(1, len(text) - i + 1) if text[i : i + n] in self.ids)
            )
            out.append(self.ids[text[i : i + n]])
            i += n
        return out

    def __call__(self, texts, add_special_tokens: bool = False):
        return {"input_ids": [self._encode(t) for t in texts]}


PIECES = [
    " cat",
    " car",
    " dog",
    " Dog",
    " x1",
    "cat",
    " a",
    "  two",
    " über",
    " has",
    " the",
    " first",
    " letter",
]


def test_vocabulary_filter_on_a_hand_made_vocabulary():
    words = vocabulary_words(StubTokenizer(PIECES), min_word_len=2)
    # " Dog" (capital), " x1" (digit), "cat" (no space), " a" (too short), "  two", " über" are left out
    assert words == ["car", "cat", "dog", "first", "has", "letter", "the"]
    assert vocabulary_words(StubTokenizer(PIECES), min_word_len=4) == ["first", "letter"]


def test_prompt_keeps_words_in_one_token_and_stops_at_the_word():
    tok = StubTokenizer(PIECES)
    seqs = prompt_tokens(tok, ["cat", "dog"], "{word} has the first letter:", ["car"], bos_id=7)
    head = " car has the first letter: C\n"
    assert seqs["cat"] == [7, *tok([head])["input_ids"][0], tok.ids[" cat"]]
    assert prompt_tokens(StubTokenizer(PIECES, split=True), ["cat"], "{word}:", [], None) == {}


def test_words_are_picked_seeded_capped_and_checked_then_split_per_letter():
    words = [f"a{c}{d}" for c in "abcdef" for d in "xyz"] + ["bee", "bob", "bus"]
    picked = pick_words(words, "ab", 10, seed=3)
    assert (
        len(picked["a"]) == 10 and picked["a"] == sorted(picked["a"]) and picked["b"] == ["bee", "bob", "bus"]
    )
    assert pick_words(words, "ab", 10, seed=3) == picked and pick_words(words, "ab", 10, seed=4) != picked
    assert (
        pick_words(words, "a", 10, seed=3)["a"] == picked["a"]
    )  # other letters do not shift a letter's words
    # words the prompt check rejects are replaced by the next ones in the seeded order
    no_x = pick_words(words, "a", 10, seed=3, keep=lambda batch: {w for w in batch if "x" not in w})
    assert len(no_x["a"]) == 10 and not any("x" in w for w in no_x["a"])
    chosen, labels, test = split_words(picked, "ab", 0.2, seed=3)
    assert labels.tolist() == [0] * 10 + [1] * 3 and chosen == picked["a"] + picked["b"]
    assert test[:10].sum() == 2 and test[10:].sum() == 1


# ---------------------------------------------------------------------------------------------- bad input
def stub_source(tokenizer) -> SimpleNamespace:
    host = SimpleNamespace(
        tokenizer=tokenizer, identity={"model": f"stub-{id(tokenizer)}"}, bos_id=None, pad_id=0
    )
    host.model_id = "stub"
    return SimpleNamespace(host=host, act_scale=1.0)


def test_a_tokenizer_that_splits_every_word_says_so(tmp_path):
    src = stub_source(StubTokenizer(PIECES, split=True))
    with pytest.raises(ValueError, match="puts no word in a single token.*host with such a tokenizer"):
        Absorption()(planted_sae(), src, tmp_path)


def test_too_few_words_names_the_letters_and_the_remedies(tmp_path):
    src = stub_source(StubTokenizer(PIECES))
    ev = Absorption(letters="cd", min_words_per_letter=3, icl_examples=[])
    with pytest.raises(ValueError, match=r"letter\(s\) c \(2\), d \(1\)\. Lower .*min_words_per_letter") as e:
        ev(planted_sae(), src, tmp_path)
    assert (
        "restrict" in str(e.value) and "max_words_per_letter" in str(e.value) and "tokenizer" in str(e.value)
    )


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="distinct lowercase"):
        Absorption(letters="aA")
    with pytest.raises(ValueError, match="exactly once"):
        Absorption(prompt_template="has the first letter:")


# ---------------------------------------------------------------------------------------------- host path
@pytest.fixture(scope="module")
def tiny_host(tmp_path_factory):
    path = save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "llama", "llama", n_layers=2, hidden=32)
    return CausalLMHost(str(path), hook=1, d_in=32)


def test_host_path_end_to_end_and_memoised(tiny_host, tmp_path):
    calls = []
    forward = tiny_host.activations

    def counted(ids, att):
        calls.append(ids.shape)
        return forward(ids, att)

    tiny_host.activations = counted
    try:
        src = TextActivations(tiny_host, SENTENCES, d_in=32)
        ev = Absorption(max_words_per_letter=8, max_k=3, batch_size=64, seed=1)
        sae = SAE(32, 64, TopK(4), b_dec_init="zeros", seed=0).eval()
        res = evaluate(sae, src, [ev], tmp_path, quiet=True)
        n_forwards = len(calls)
        # the shared in-context prefix runs once; the full forward only checks the first batch
        assert n_forwards == 1
        for m in ("absorption", "mean_absorption_fraction", "mean_full_absorption"):
            assert math.isfinite(res.metrics[m]) and 0 <= res.metrics[m] <= 1, m
        assert res.metrics["absorption"] == res.metrics["mean_absorption_fraction"]
        letters = res.data["absorption_per_letter"]
        assert set(letters) == set("abcdefghijklmnopqrstuvwxyz")
        assert all(4 <= e["n_words"] <= 8 and 0 <= e["probe_f1"] <= 1 for e in letters.values())
        assert (tmp_path / "absorption.png").exists()
        # a second SAE (and a source that normalised its activations) pays no host forward
        other = SAE(32, 48, TopK(2), b_dec_init="zeros", seed=1).eval()
        again = ev(other, SimpleNamespace(host=tiny_host, act_scale=2.0), tmp_path)
        assert len(calls) == n_forwards and math.isfinite(again.metrics["absorption"])
    finally:
        del tiny_host.activations


# ---------------------------------------------------------------------------------------------- synthetic
def test_synthetic_source_reports_ground_truth_absorption(tmp_path):
    src = SyntheticDataModule(d_in=16, n_features=48, batch_size=256, n_parents=3, children_per_parent=2)
    sae = SAE(16, 32, TopK(4), b_dec_init="zeros", seed=0).eval()
    res = Absorption(n_samples=2048, plot=False)(sae, src, tmp_path)
    x, coeffs = src.features.sample(2048, -1000)
    with torch.no_grad():
        ref = synthetic_absorption(
            sae(x).codes, coeffs, sae.W_dec, src.features.directions, src.features.parent_of
        )
    assert res.metrics == {"absorption": pytest.approx(ref["absorption"])}
    assert res.data["absorption_per_parent"] == pytest.approx(ref["per_parent"])
    assert res.data["parent_match_cos"] == pytest.approx(ref["parent_match_cos"])


def test_applies_to_synthetic_and_text_sources_and_skips_others(tmp_path, capsys):
    ev = Absorption()
    assert ev.applies_to(SyntheticDataModule(d_in=8, n_features=32, batch_size=8)) is None
    assert ev.applies_to(stub_source(StubTokenizer(PIECES))) is None
    res = evaluate(planted_sae(), SimpleNamespace(host=SimpleNamespace(d_in=8)), [ev], tmp_path)
    assert res.metrics == {}
    assert "skipped evaluator absorption: the source SimpleNamespace has neither" in capsys.readouterr().out


def test_shared_prefix_cache_matches_the_full_forward(tiny_host):
    """The in-context lines run once (key/value cache) and each word alone: the same activations."""
    tok = tiny_host.tokenizer
    seqs = prompt_tokens(
        tok, ["cat", "dog", "tree", "house", "zebra"], "{word} has the first letter:", ["apple", "river"], 1
    )
    words = list(seqs.values())
    p = shared_prefix_len(words)
    assert p == len(words[0]) - 1 and all(len(s) == p + 1 for s in words)
    full = word_activations(tiny_host, words, 2, share_prefix=False)
    cached = word_activations(tiny_host, words, 2)
    assert torch.allclose(full, cached, atol=1e-5)
    assert shared_prefix_len([[1, 2, 3], [1, 2, 4], [1, 5]]) == 1
    assert shared_prefix_len([[1, 2], [1, 2]]) == 1  # at least one token of each stays after the prefix
