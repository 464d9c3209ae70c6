"""Export/import round trips (SAELens and sparsify formats) and atomic writes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from saelab.files import atomic_dir
from saelab.io import load_sae, load_sparsify, save_sae, save_sparsify
from saelab.sae import SAE, BatchTopK, JumpReLU, ReLU, ResidualSAE, TopK

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


@pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None, reason="sae_lens not installed")
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
    path = save_sparsify(sae, tmp_path / "layers.6")
    t = load_file(path / "sae.safetensors")
    assert t["encoder.weight"].shape == (64, 16) and t["W_dec"].shape == (64, 16)
    assert json.loads((path / "cfg.json").read_text())["k"] == 4
    back = load_sparsify(path)
    x = torch.randn(8, 16)
    assert torch.equal(back(x).x_hat, sae(x).x_hat)
    with pytest.raises(TypeError, match="TopK"):
        save_sparsify(_trained(ReLU()), tmp_path / "bad")


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
