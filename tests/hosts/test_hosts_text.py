"""Causal-LM host (hook = hidden state, splicing, errors, online configs) and the text activation datamodule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from support import SENTENCES, save_tiny_causal_lm

from saelab.data.text import TextActivations, pack
from saelab.hosts.causal_lm import CausalLMHost

TEXTS = SENTENCES * 6


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "llama", "llama", n_layers=3, hidden=32)


def _ids(host, texts=TEXTS[:2]):
    tok = host.tokenizer
    batch = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("hook", [1, "model.layers.1", -2])
def test_hook_equals_hidden_state(tiny_llama, hook):
    host = CausalLMHost(str(tiny_llama), hook=hook, d_in=32)
    ids, att = _ids(host)
    acts = host.activations(ids, att)
    ref = host.model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[2]
    assert host.hook == "model.layers.1"
    assert acts.shape == (2, ids.shape[1], 32)
    torch.testing.assert_close(acts, ref, rtol=0, atol=0)


def test_forward_stops_after_hook(tiny_llama):
    host = CausalLMHost(str(tiny_llama), hook=0)
    calls = []
    handle = host.model.model.layers[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        host.activations(*_ids(host))
    finally:
        handle.remove()
    assert calls == []


def test_identity_splice_leaves_loss_unchanged_and_zero_splice_changes_it(tiny_llama):
    host = CausalLMHost(str(tiny_llama), hook=1)
    ids, att = _ids(host)
    clean = host.token_losses(ids, att)
    with host.spliced(lambda h: h):
        same = host.token_losses(ids, att)
    with host.spliced(torch.zeros_like):
        ablated = host.token_losses(ids, att)
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert (ablated - clean).abs().max() > 1e-3
    # per-token CE against F.cross_entropy with padding ignored
    logits = host.logits(ids, att)
    tgt = ids[:, 1:].masked_fill(att[:, 1:] == 0, -100)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tgt, reduction="none")
    torch.testing.assert_close(clean, ref, rtol=1e-5, atol=1e-5)


def test_wrong_hook_lists_valid_ones(tiny_llama):
    host = CausalLMHost(str(tiny_llama), hook="model.layerz.1")
    with pytest.raises(ValueError, match=r"model\.layers\.0, model\.layers\.1, model\.layers\.2"):
        host.activations(*_ids(host))
    with pytest.raises(ValueError, match="out of range"):
        _ = CausalLMHost(str(tiny_llama), hook=7).model


def test_declared_width_is_checked(tiny_llama):
    with pytest.raises(ValueError, match="d_in=64"):
        _ = CausalLMHost(str(tiny_llama), hook=1, d_in=64).model


@pytest.mark.parametrize(
    "name,arch,block",
    [
        ("pythia70m", "gpt_neox", "gpt_neox.layers"),
        ("gpt2", "gpt2", "transformer.h"),
        ("gemma2_2b", "gemma2", "model.layers"),
    ],
)
def test_online_host_configs_load_through_from_pretrained(cfg_factory, tmp_path, name, arch, block):
    cfg = cfg_factory(["data=text", f"data/host={name}"])
    hook = int(cfg.data.host.hook)
    path = save_tiny_causal_lm(tmp_path / arch, arch, n_layers=hook + 2, hidden=16)
    cfg.data.host.model = str(path)
    cfg.data.host.d_in = 16
    host = instantiate(cfg.data.host)
    assert isinstance(host, CausalLMHost)
    ids, att = _ids(host)
    acts = host.activations(ids, att)
    ref = host.model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[hook + 1]
    assert host.hook == f"{block}.{hook}"
    torch.testing.assert_close(acts, ref, rtol=1e-5, atol=1e-5)
    with host.spliced(lambda h: h):
        torch.testing.assert_close(host.token_losses(ids, att), host.token_losses(ids, att))


def test_missing_online_model_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    host = CausalLMHost("EleutherAI/not-a-cached-model-xyz", hook=0)
    with pytest.raises(OSError, match="data/host=smollm2"):
        _ = host.model


def test_pack_marks_bos_and_padding(tiny_llama):
    tok = CausalLMHost(str(tiny_llama)).tokenizer
    ctx = pack(tok, TEXTS, context_len=16, bos_id=1, sep_id=2, max_tokens=60)
    assert ctx.input_ids.shape == (4, 16)  # ceil(60 / 15) full contexts
    assert (ctx.input_ids[:, 0] == 1).all() and not ctx.sae_mask[:, 0].any() and ctx.sae_mask[:, 1:].all()
    stream = [t for s in TEXTS for t in [*tok(s, add_special_tokens=False)["input_ids"], 2]]
    assert ctx.input_ids[:, 1:].reshape(-1).tolist() == stream[:60]
    short = pack(tok, TEXTS[:1], context_len=64, bos_id=1, sep_id=2, max_tokens=None)
    n = len(tok(TEXTS[0], add_special_tokens=False)["input_ids"]) + 1
    assert short.attention_mask.sum() == n + 1 and short.sae_mask.sum() == n  # padding and BOS excluded


def test_text_datamodule_caches_and_resumes(tiny_llama, tmp_path):
    def make():
        host = CausalLMHost(str(tiny_llama), hook=1, d_in=32)
        return TextActivations(
            host, TEXTS, TEXTS[::-1], context_len=16, train_tokens=300, val_tokens=60, batch_size=32,
            harvest_batch=4, cache=True, cache_dir=str(tmp_path / "cache"), seed=3,
        )  # fmt: skip

    dm = make()
    store = dm.store("train")
    assert store.built and store.n_tokens == 300 and store.d_in == 32
    # the cached rows are the host's activations at the SAE positions, in context order
    ctx = dm.contexts("train")
    direct = dm.host.activations(ctx.input_ids[:2], ctx.attention_mask[:2])[ctx.sae_mask[:2]]
    np.testing.assert_allclose(store.rows(np.arange(30))["acts"], direct.numpy(), rtol=1e-5, atol=1e-5)
    assert dm.token_ids("train")[:30].tolist() == ctx.input_ids[:2][ctx.sae_mask[:2]].tolist()
    # a second datamodule with the same key reuses the cache; a resumed stream is the tail of the full one
    dm2 = make()
    assert not dm2.store("train").built
    it = iter(dm2.train_dataloader())
    full = [next(it) for _ in range(12)]
    dm2.position = 0
    dm2.load_state_dict({"position": 7})
    resumed = iter(dm2.train_dataloader())
    for want in full[7:]:
        got = next(resumed)
        torch.testing.assert_close(got["acts"], want["acts"])
        assert got["token_ids"].tolist() == want["token_ids"].tolist()
    assert set(full[0]) == {"acts", "token_ids"} and full[0]["acts"].shape == (32, 32)
    val = list(dm2.val_dataloader())
    assert sum(b["acts"].shape[0] for b in val) == 60


def test_stream_mode_runs_the_host(tiny_llama):
    host = CausalLMHost(str(tiny_llama), hook=1, d_in=32)
    dm = TextActivations(
        host, TEXTS, TEXTS, context_len=16, train_tokens=64, val_tokens=30, batch_size=32, cache=False
    )
    b = next(iter(dm.train_dataloader()))
    assert b["acts"].shape == (32, 32) and b["token_ids"].shape == (32,)
    assert sum(x["acts"].shape[0] for x in dm.val_dataloader()) == 30


def test_smollm2_embedded_default(cfg_factory):
    """The real embedded SmolLM2: layer-6 hook = output_hidden_states[7]; prompt loss as measured in assets.md."""
    cfg = cfg_factory(["data=text"])
    host = instantiate(cfg.data.host)
    ids = host.tokenizer(
        "The theory of general relativity describes gravity as", return_tensors="pt"
    ).input_ids
    acts = host.activations(ids)
    ref = host.model(input_ids=ids, output_hidden_states=True).hidden_states[7]
    assert host.hook == "model.layers.6" and acts.shape == (1, ids.shape[1], 576)
    torch.testing.assert_close(acts, ref, rtol=0, atol=0)
    assert abs(host.token_losses(ids).mean().item() - 2.88) < 0.05
