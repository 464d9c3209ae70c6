"""Exports that other tools use as written: the host model, hook, context and data fields SAELens, SAEBench
and Neuronpedia key on, and SAELens's TransformerBridge running the export on the embedded SmolLM2."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from support import SENTENCES, make_tiny_esm, save_tiny_causal_lm

from saelab import kernels
from saelab.corpora.text import Corpus
from saelab.data.text import TextActivations
from saelab.hosts.causal_lm import CausalLMHost, embedded_model_dir
from saelab.hosts.masked_lm import load_masked_lm
from saelab.io import save_sae, source_metadata
from saelab.sae import SAE, BatchTopK

HAS_SAE_LENS = importlib.util.find_spec("sae_lens") is not None


@pytest.mark.parametrize(
    ("arch", "hf_hook", "hookpoint"),
    [
        ("llama", "model.layers.1", "layers.1"),
        ("gpt2", "transformer.h.1", "h.1"),
        ("gpt_neox", "gpt_neox.layers.1", "layers.1"),
    ],
)
def test_block_hooks_get_transformer_lens_names(tmp_path, arch, hf_hook, hookpoint):
    """A block output is `blocks.{i}.hook_resid_post` in every family; the HF path and sparsify's hookpoint
    (the path under `base_model`) are kept beside it."""
    host = CausalLMHost(str(save_tiny_causal_lm(tmp_path / arch, arch, n_layers=2)), hook=1)
    meta = host.export_metadata
    assert meta == {
        "model_name": host.model_id,
        "hook_name": "blocks.1.hook_resid_post",
        "hf_hook_name": hf_hook,
    }
    assert host.sparsify_hookpoint == hookpoint


def test_other_hooks_keep_their_module_path(tmp_path):
    host = CausalLMHost(
        str(save_tiny_causal_lm(tmp_path / "llama", "llama", n_layers=2)), hook="model.layers.1.mlp"
    )
    assert host.export_metadata["hook_name"] == "model.layers.1.mlp"


def test_protein_export_names_model_hook_and_windows(tmp_path):
    """A masked protein LM keeps its HF id and module path (TransformerLens has no such models); the context
    is the longest window with its start and end tokens."""
    d = make_tiny_esm(tmp_path / "esm")
    host = load_masked_lm(str(d), hook=1, d_in=16)
    meta = source_metadata(SimpleNamespace(host=host, max_residues=50, files=None))
    assert (meta["model_name"], meta["hook_name"], meta["hf_hook_name"]) == (
        str(d),
        "esm.encoder.layer.1",
        "esm.encoder.layer.1",
    )
    assert (meta["context_size"], meta["prepend_bos"]) == (52, True) and "emboss-test" in meta["dataset_path"]


def _smollm2_source() -> TextActivations:
    corpus = Corpus("physics", list(SENTENCES), [str(i) for i in range(len(SENTENCES))])
    return TextActivations(
        CausalLMHost("smollm2", hook=6), corpus, context_len=32, train_tokens=64, batch_size=32
    )


def test_smollm2_export_names_model_hook_context_and_data(tmp_path):
    """The export of an SAE on the embedded SmolLM2 names the upstream model, the hook as SAELens does, the
    context, BOS and corpus, and says that the weights are the dequantised Q4_1 file, not the bf16 original."""
    path = save_sae(SAE(576, 64, BatchTopK(4)), tmp_path / "sae", metadata=source_metadata(_smollm2_source()))
    meta = json.loads((path / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (meta["hook_name"], meta["hf_hook_name"]) == ("blocks.6.hook_resid_post", "model.layers.6")
    assert (meta["context_size"], meta["prepend_bos"], meta["dataset_path"]) == (32, True, "physics")
    assert (
        "Q4_1" in meta["model_weights"]
        and "float32" in meta["model_weights"]
        and "bf16" in meta["model_weights"]
    )
    if HAS_SAE_LENS:
        from sae_lens import SAE as LensSAE

        lens = LensSAE.load_from_disk(str(path), device="cpu")
        assert lens.get_name() == "sae_HuggingFaceTB/SmolLM2-135M-Instruct_blocks.6.hook_resid_post_64"


def _bridge_available() -> bool:
    return HAS_SAE_LENS and importlib.util.find_spec("transformer_lens.model_bridge") is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not _bridge_available(), reason="sae_lens with transformer-lens 3 (TransformerBridge) not installed"
)
def test_sae_lens_bridge_attaches_export_and_matches_spliced_ce(tmp_path, monkeypatch):
    """SAELens boots the converted SmolLM2 folder offline, `add_sae` attaches the export as written, and its
    `run_with_saes` CE equals saelab's spliced CE on the same tokens, for an SAE trained on s·h (s folded).

    saelab's side runs its encoder product as torch's addmm here, the product SAELens's SAE uses: with
    oneDNN's (`kernels.encoder_affine`, the same sums in another order) pre-activations within rounding of
    the BatchTopK threshold fall on its other side, and the CE moved by 3e-4 of itself."""
    monkeypatch.setattr(kernels, "has_onednn_linear", lambda dtype: False)
    from sae_lens import SAE as LensSAE
    from sae_lens import SAETransformerBridge

    from saelab.data.stream import norm_scale
    from saelab.eval.base import in_host_units
    from saelab.eval.spliced import sae_splice

    src = _smollm2_source()
    host = src.host
    rows = [host.tokenizer(t, add_special_tokens=False).input_ids for t in SENTENCES[:3]]
    n = min(map(len, rows))
    ids = torch.tensor([[host.bos_id, *r[:n]] for r in rows])  # (3, n + 1), no padding
    h = host.activations(ids)[:, 1:].reshape(-1, 576)  # BOS left out of the scale, as the text source does
    s = norm_scale(h, 576)
    torch.manual_seed(0)
    sae = SAE(576, 1152, BatchTopK(32), seed=1)
    with torch.no_grad():
        sae.b_dec.copy_((s * h).mean(0))
        sae.b_enc.normal_(0, 0.05)
    sae.train()(s * h)  # sets the BatchTopK inference threshold
    sae.eval()
    path = save_sae(sae, tmp_path / "sae", metadata=source_metadata(src), act_scale=s)

    bridge = SAETransformerBridge.boot_transformers(str(embedded_model_dir()), device="cpu")
    lens = LensSAE.load_from_disk(str(path), device="cpu")
    bridge.add_sae(lens)
    assert list(bridge.acts_to_saes) == ["blocks.6.hook_resid_post"]  # attached as written
    bridge.reset_saes()
    with torch.no_grad():
        ce_lens = float(bridge.run_with_saes(ids, saes=[lens], return_type="loss"))
        ce_clean_lens = float(bridge(ids, return_type="loss"))
    with host.spliced(
        sae_splice(in_host_units(sae, SimpleNamespace(act_scale=s)), torch.ones_like(ids, dtype=torch.bool))
    ):
        ce_saelab = float(host.token_losses(ids).mean())
    ce_clean = float(host.token_losses(ids).mean())
    assert ce_lens > ce_clean + 0.01  # the splice changes the loss, so the comparison below means something
    assert ce_lens == pytest.approx(ce_saelab, rel=1e-4)
    assert ce_clean_lens == pytest.approx(ce_clean, rel=1e-5)
