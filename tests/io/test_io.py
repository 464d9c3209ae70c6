"""Export/import round trips (SAELens and sparsify formats), input-scale folding, inference-mode loading and
atomic writes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from saelab.files import atomic_dir
from saelab.io import load_sae, load_sparsify, save_sae, save_sparsify
from saelab.sae import SAE, BatchTopK, JumpReLU, ReLU, ResidualSAE, TopK

HAS_SAE_LENS = importlib.util.find_spec("sae_lens") is not None

ACTIVATIONS = {
    "relu": lambda: ReLU(),
    "topk": lambda: TopK(4),
    "batchtopk": lambda: BatchTopK(4),
    "jumprelu": lambda: JumpReLU(64, threshold_init=0.05),
}


def _trained(act) -> SAE:
    torch.manual_seed(0)
    sae = SAE(16, 64, act, seed=4)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    sae.train()(torch.randn(64, 16))  # sets a BatchTopK threshold
    return sae.eval()


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_saelens_round_trip(tmp_path, name):
    sae = _trained(ACTIVATIONS[name]())
    path = save_sae(sae, tmp_path / "sae", metadata={"hook_name": "model.layers.6"})
    cfg = json.loads((path / "cfg.json").read_text())
    assert (
        cfg["metadata"]["sae_lens_version"].startswith("6.")
        and cfg["metadata"]["hook_name"] == "model.layers.6"
    )
    tensors = load_file(path / "sae_weights.safetensors")
    assert tensors["W_enc"].shape == (16, 64) and tensors["W_dec"].shape == (64, 16)
    back = load_sae(path)
    assert type(back.activation) is type(sae.activation)
    x = torch.randn(32, 16)
    assert torch.equal(back(x).x_hat, sae(x).x_hat)
    assert torch.equal(back(x).codes, sae(x).codes)


@pytest.mark.skipif(not HAS_SAE_LENS, reason="sae_lens not installed")
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_export_loads_in_sae_lens(tmp_path, name):
    from sae_lens import SAE as LensSAE

    sae = _trained(ACTIVATIONS[name]())
    lens = LensSAE.load_from_disk(str(save_sae(sae, tmp_path / "sae")), device="cpu")
    x = torch.randn(32, 16)
    with torch.no_grad():
        assert torch.allclose(lens.encode(x), sae(x).codes, atol=1e-5)
        assert torch.allclose(lens(x), sae(x).x_hat, atol=1e-5)


def test_residual_exports_stitched(tmp_path):
    base = _trained(BatchTopK(4))
    res = SAE(16, 8, BatchTopK(2), apply_b_dec_to_input=False, b_dec_init="zeros")
    boosted = ResidualSAE(base, res)
    boosted.train()(torch.randn(64, 16))
    boosted.eval()
    back = load_sae(save_sae(boosted, tmp_path / "stitched"))
    assert back.d_sae == 64 + 8
    x = torch.randn(20, 16)
    assert torch.allclose(back(x).x_hat, boosted(x).x_hat, atol=1e-5)


def test_sparsify_round_trip(tmp_path):
    sae = _trained(TopK(4))
    path = save_sparsify(sae, tmp_path, "layers.6")
    assert path == tmp_path / "layers.6"
    t = load_file(path / "sae.safetensors")
    assert t["encoder.weight"].shape == (64, 16) and t["W_dec"].shape == (64, 16)
    assert json.loads((path / "cfg.json").read_text())["k"] == 4
    back = load_sparsify(path)
    x = torch.randn(8, 16)
    assert torch.equal(back(x).x_hat, sae(x).x_hat)
    with pytest.raises(TypeError, match="TopK"):
        save_sparsify(_trained(ReLU()), tmp_path, "bad")


def _sparsify_run(root):
    saes = {"layers.3": _trained(TopK(4)), "layers.6": _trained(TopK(3))}
    for hookpoint, sae in saes.items():
        save_sparsify(sae, root, hookpoint, act_scale=0.5)
    return saes


def test_sparsify_exports_are_named_by_hookpoint(tmp_path):
    """Each hookpoint's SAE lands in `<run>/<hookpoint>/`, the layout `SparseCoder.load_many(run, local=True)`
    reads (one folder per hookpoint, named by it)."""
    _sparsify_run(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["layers.3", "layers.6"]


@pytest.mark.skipif(
    importlib.util.find_spec("sparsify") is None, reason="sparsify (eai-sparsify) not installed"
)
def test_sparsify_load_many_finds_exports(tmp_path):
    """sparsify's own loader finds both SAEs under their hookpoints and, fed raw h, encodes as the saelab
    SAE trained on 0.5·h does (the scale is folded into the export)."""
    from sparsify import SparseCoder

    saes = _sparsify_run(tmp_path / "run")
    coders = SparseCoder.load_many(str(tmp_path / "run"), local=True)
    assert sorted(coders) == ["layers.3", "layers.6"]
    h = torch.randn(8, 16)
    for hookpoint, sae in saes.items():
        enc = coders[hookpoint].encode(h)
        dense = torch.zeros(8, 64).scatter_(-1, enc.top_indices, enc.top_acts)
        torch.testing.assert_close(dense, sae(0.5 * h).codes / 0.5, rtol=1e-5, atol=1e-5)


SCALE = 0.05  # an act_scale far from 1, as for a residual stream with ‖h‖ ≫ √d_in


@pytest.mark.skipif(not HAS_SAE_LENS, reason="sae_lens not installed")
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_scaled_export_reads_raw_activations_in_sae_lens(tmp_path, name):
    """An SAE trained on s·h exports with s folded in: SAELens fed raw h gives x̂(s·h)/s and codes f(s·h)/s,
    and the decoder rows keep unit norm."""
    from sae_lens import SAE as LensSAE

    sae = _trained(ACTIVATIONS[name]())
    path = save_sae(sae, tmp_path / "sae", act_scale=SCALE)
    lens = LensSAE.load_from_disk(str(path), device="cpu")
    h = torch.randn(32, 16) / SCALE
    with torch.no_grad():
        out = sae(SCALE * h)
        torch.testing.assert_close(lens(h), out.x_hat / SCALE, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lens.encode(h), out.codes / SCALE, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lens.W_dec.norm(dim=1), torch.ones(64))
    meta = json.loads((path / "cfg.json").read_text())["metadata"]
    assert meta["act_scale"] == SCALE and meta["saelab_folded_scale"] == SCALE


@pytest.mark.skipif(not HAS_SAE_LENS, reason="sae_lens not installed")
def test_scaled_residual_export_reads_raw_activations_in_sae_lens(tmp_path):
    from sae_lens import SAE as LensSAE

    boosted = ResidualSAE(_trained(BatchTopK(4)), SAE(16, 8, BatchTopK(2), apply_b_dec_to_input=False))
    boosted.train()(torch.randn(64, 16))
    boosted.eval()
    lens = LensSAE.load_from_disk(str(save_sae(boosted, tmp_path / "s", act_scale=SCALE)), device="cpu")
    h = torch.randn(20, 16) / SCALE
    with torch.no_grad():
        torch.testing.assert_close(lens(h), boosted(SCALE * h).x_hat / SCALE, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_scaled_export_reloads_as_trained(tmp_path, name):
    """`load_sae` and `sae.init_from` multiply the folded scale back in: the SAE reads s·h again, as in
    training, and exporting the reloaded SAE anew writes the same weights."""
    sae = _trained(ACTIVATIONS[name]())
    path = save_sae(sae, tmp_path / "sae", act_scale=SCALE)
    back = load_sae(path)
    init = SAE(16, 64, ACTIVATIONS[name](), init_from=str(path)).eval()
    x = torch.randn(32, 16)
    with torch.no_grad():
        for other in (back, init):
            torch.testing.assert_close(other(x).x_hat, sae(x).x_hat, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(other(x).codes, sae(x).codes, rtol=1e-5, atol=1e-5)
    assert back.act_scale == SCALE
    again = load_file(save_sae(back, tmp_path / "again") / "sae_weights.safetensors")
    for k, v in load_file(path / "sae_weights.safetensors").items():
        torch.testing.assert_close(again[k], v, rtol=1e-6, atol=1e-7)


def test_loaded_saes_are_for_inference(tmp_path):
    """A loaded SAE is in eval mode without parameter gradients unless asked to be trainable."""
    path = save_sae(_trained(BatchTopK(4)), tmp_path / "sae")
    sparse = save_sparsify(_trained(TopK(4)), tmp_path / "run", "layers.6")
    for sae in (load_sae(path), load_sparsify(sparse)):
        assert not sae.training and not any(p.requires_grad for p in sae.parameters())
    for sae in (load_sae(path, trainable=True), load_sparsify(sparse, trainable=True)):
        assert sae.training and all(p.requires_grad for p in sae.parameters())


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "export"
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "a.txt").read_text() == "old"  # the previous export survives intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp dirs left


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)
    sae = _trained(TopK(4))
    save_sae(sae, tmp_path / "s")
    other = SAE(16, 32, TopK(4))
    with pytest.raises(ValueError, match="d_sae"):
        other.load_weights(tmp_path / "s")
    with pytest.raises(ValueError, match="act_scale="):  # a scale recorded but not folded
        save_sae(sae, tmp_path / "t", metadata={"act_scale": 0.5})
