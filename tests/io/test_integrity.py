"""Exports are checked on load: the sha256 of their weights, and every `cfg.json` field the loaders use, so a
damaged or inconsistent export stops with one line naming the file and the field instead of loading silently
or failing at the first forward."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from saelab.__main__ import friendly_error
from saelab.files import CorruptFile, sha256_file
from saelab.io import load_sae, load_sparsify, save_sae, save_sparsify
from saelab.sae import SAE, BatchTopK, TopK

HAS_SAE_LENS = importlib.util.find_spec("sae_lens") is not None
SHA_KEY = "saelab_weights_sha256"


def _export(tmp_path: Path, act=None) -> Path:
    torch.manual_seed(0)
    sae = SAE(16, 64, act or TopK(4), seed=1)
    with torch.no_grad():
        sae.b_dec.normal_()
    return save_sae(sae.eval(), tmp_path / "sae")


def _flip_last_byte(f: Path) -> None:
    """Flip one bit of the last tensor byte: the file still parses, only a value changes."""
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))


def _edit_cfg(folder: Path, **fields) -> Path:
    cfg_file = folder / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    for key, value in fields.items():
        *parents, last = key.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    cfg_file.write_text(json.dumps(cfg))
    return cfg_file


# ------------------------------------------------------------------------------------------ checksums


def test_exports_record_the_sha256_of_their_weights(tmp_path):
    path = _export(tmp_path)
    meta = json.loads((path / "cfg.json").read_text())["metadata"]
    assert meta[SHA_KEY] == sha256_file(path / "sae_weights.safetensors")
    sparse = save_sparsify(SAE(16, 64, TopK(4)), tmp_path / "run", "layers.6")
    assert json.loads((sparse / "cfg.json").read_text())[SHA_KEY] == sha256_file(sparse / "sae.safetensors")


def test_a_flipped_weight_byte_stops_every_loader(tmp_path):
    path = _export(tmp_path)
    w_file = path / "sae_weights.safetensors"
    _flip_last_byte(w_file)
    load_file(w_file)  # still a valid safetensors file: only the checksum can tell
    for load in (
        lambda: load_sae(path),
        lambda: SAE(16, 64, TopK(4), init_from=str(path)),  # sae.init_from
        lambda: SAE(16, 64, TopK(4)).load_weights(w_file),
    ):
        with pytest.raises(CorruptFile, match="fails its checksum") as err:
            load()
        assert str(w_file) in str(err.value) and "Re-export the SAE, or delete" in str(err.value)
        assert "\n" not in str(err.value)


def test_a_flipped_sparsify_byte_stops_load_sparsify(tmp_path):
    path = save_sparsify(SAE(16, 64, TopK(4)), tmp_path / "run", "layers.6")
    _flip_last_byte(path / "sae.safetensors")
    with pytest.raises(CorruptFile, match="fails its checksum") as err:
        load_sparsify(path)
    assert str(path / "sae.safetensors") in str(err.value)


def test_exports_without_a_checksum_still_load(tmp_path):
    """Exports written by SAELens or an older saelab carry no checksum; they load as before."""
    path = _export(tmp_path)
    _edit_cfg(path, metadata__saelab_weights_sha256=None)
    _flip_last_byte(path / "sae_weights.safetensors")  # nothing to check it against
    assert load_sae(path).d_sae == 64
    sparse = save_sparsify(SAE(16, 64, TopK(4)), tmp_path / "run", "layers.6")
    _edit_cfg(sparse, saelab_weights_sha256=None)
    assert load_sparsify(sparse).d_sae == 64


@pytest.mark.skipif(not HAS_SAE_LENS, reason="sae_lens not installed")
def test_an_export_rewritten_by_sae_lens_loads(tmp_path):
    """SAELens's `save_model` copies cfg.json's metadata, saelab's checksum included, but writes its own
    weights file (here after changing a weight, as fine-tuning would): that checksum no longer applies."""
    from sae_lens import SAE as LensSAE

    lens = LensSAE.load_from_disk(str(_export(tmp_path, BatchTopK(4))), device="cpu")
    with torch.no_grad():
        lens.b_dec.add_(1.0)
    lens.save_model(tmp_path / "lens")
    assert SHA_KEY in json.loads((tmp_path / "lens" / "cfg.json").read_text())["metadata"]
    back = load_sae(tmp_path / "lens")
    torch.testing.assert_close(back.b_dec, lens.b_dec.detach())


# ------------------------------------------------------------------------------------ damaged files


def test_damaged_cfg_json_names_the_file(tmp_path):
    path = _export(tmp_path)
    (path / "cfg.json").write_text('{"architecture": "topk", "d_in": 16,')  # cut short
    for load in (lambda: load_sae(path), lambda: SAE(16, 64, TopK(4), init_from=str(path))):
        with pytest.raises(CorruptFile, match="is not valid JSON") as err:
            load()
        assert str(path / "cfg.json") in str(err.value) and "Re-export" in str(err.value)


def test_damaged_safetensors_names_the_file(tmp_path):
    path = _export(tmp_path)
    _edit_cfg(path, metadata__saelab_weights_sha256=None)  # no checksum: the parse itself must fail clearly
    w_file = path / "sae_weights.safetensors"
    w_file.write_bytes(w_file.read_bytes()[:100])  # truncated
    for load in (lambda: load_sae(path), lambda: SAE(16, 64, TopK(4), init_from=str(path))):
        with pytest.raises(CorruptFile, match="is not a readable safetensors file") as err:
            load()
        assert str(w_file) in str(err.value) and "Re-export" in str(err.value)


class Payload:
    """Unpickling this creates `marker` (a crafted file would call os.system the same way)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_named_like_the_weights_is_not_unpickled(tmp_path):
    """A torch pickle saved as sae_weights.safetensors is refused by the safetensors reader, unrun."""
    path = _export(tmp_path)
    _edit_cfg(path, metadata__saelab_weights_sha256=None)
    marker = tmp_path / "ran"
    torch.save({"W_enc": Payload(marker)}, path / "sae_weights.safetensors")
    with pytest.raises(CorruptFile, match="not a readable safetensors file"):
        load_sae(path)
    assert not marker.exists()


def test_sae_base_error_is_one_line_naming_the_file(tmp_path, cfg_factory):
    """`sae=residual sae.base.path=<export>` builds the base through Hydra; the line the CLI prints (its
    `friendly_error`) is the export's own, not Hydra's wrapper."""
    path = _export(tmp_path, BatchTopK(4))
    _flip_last_byte(path / "sae_weights.safetensors")
    cfg = cfg_factory(["sae=residual", f"sae.base.path={path}", "data.d_in=16"])
    with pytest.raises(Exception) as err:  # Hydra wraps it; friendly_error unwraps it
        instantiate(cfg.sae)
    line = friendly_error(err.value)
    assert line.startswith(f"CorruptFile: {path / 'sae_weights.safetensors'} fails its checksum"), line


# --------------------------------------------------------------------------------- cfg.json fields


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"k": 70, "metadata__saelab_activation__k": 70}, "metadata.saelab_activation.k=70 exceeds d_sae=64"),
        ({"k": 70, "metadata__saelab_activation": None}, "k=70 exceeds d_sae=64"),
        ({"k": 0, "metadata__saelab_activation": None}, "k=0 is not a positive integer"),
        ({"d_in": "16"}, "d_in='16' is not a positive integer"),
        ({"d_in": 0}, "d_in=0 is not a positive integer"),
        ({"d_sae": 64.5}, "d_sae=64.5 is not a positive integer"),
        ({"d_sae": None}, "d_sae=None is not a positive integer"),
        ({"d_sae": 32}, "W_enc has shape (16, 64), but cfg.json's d_in=16, d_sae=32"),
        ({"d_in": 8}, "W_enc has shape (16, 64), but cfg.json's d_in=8, d_sae=64"),
        ({"dtype": "float8"}, "dtype must be one of"),
        ({"metadata__saelab_activation": {"name": "gelu"}}, "metadata.saelab_activation="),
        ({"metadata__saelab_folded_scale": -2.0}, "saelab_folded_scale=-2.0 is not a positive number"),
        ({"metadata": [1, 2]}, "expected a JSON object with a `metadata` object"),
    ],
)
def test_inconsistent_cfg_is_one_line_naming_file_and_field(tmp_path, fields, message):
    path = _export(tmp_path)
    _edit_cfg(path, **fields)
    with pytest.raises(CorruptFile) as err:
        load_sae(path)
    text = str(err.value)
    assert message in text, text
    assert str(path) in text and "Re-export the SAE, or delete" in text and "\n" not in text


def test_unknown_architecture_names_the_file(tmp_path):
    path = _export(tmp_path)
    cfg_file = _edit_cfg(path, architecture="gated")
    with pytest.raises(ValueError, match="architecture='gated' is not one saelab reads") as err:
        load_sae(path)
    assert str(cfg_file) in str(err.value)


def test_weights_lacking_a_tensor_name_the_file(tmp_path):
    path = _export(tmp_path)
    _edit_cfg(path, metadata__saelab_weights_sha256=None)
    w_file = path / "sae_weights.safetensors"
    sd = load_file(w_file)
    del sd["W_dec"]
    save_file(sd, str(w_file))
    with pytest.raises(CorruptFile, match="lacks W_dec") as err:
        SAE(16, 64, TopK(4), init_from=str(path))
    assert str(w_file) in str(err.value)


def test_weights_with_nan_are_refused_naming_the_file(tmp_path):
    """A NaN weight would make its latent's pre-activations NaN; refused on load, before any training."""
    path = _export(tmp_path)
    _edit_cfg(path, metadata__saelab_weights_sha256=None)
    w_file = path / "sae_weights.safetensors"
    sd = load_file(w_file)
    sd["W_enc"][3, 5] = float("nan")
    save_file(sd, str(w_file))
    with pytest.raises(ValueError, match="W_enc holds NaN or infinite values") as err:
        SAE(16, 64, TopK(4)).load_weights(path)
    assert str(w_file) in str(err.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"k": 65}, "k=65 is not a positive integer up to the 64 latents"),
        ({"k": "4"}, "k='4' is not a positive integer"),
        ({"d_in": 8}, "d_in=8 but the weights have 16"),
        ({"num_latents": 32}, "num_latents=32 but the weights have 64"),
    ],
)
def test_inconsistent_sparsify_cfg_names_file_and_field(tmp_path, fields, message):
    path = save_sparsify(SAE(16, 64, TopK(4)), tmp_path / "run", "layers.6")
    _edit_cfg(path, **fields)
    with pytest.raises(CorruptFile, match=message.replace("(", r"\(")) as err:
        load_sparsify(path)
    assert str(path / "cfg.json") in str(err.value)


def test_valid_exports_still_load_as_before(tmp_path):
    """The checks pass on what saelab writes: round trips are unchanged."""
    sae = SAE(16, 64, TopK(4), seed=3).eval()
    back = load_sae(save_sae(sae, tmp_path / "sae"))
    sparse = load_sparsify(save_sparsify(sae, tmp_path / "run", "layers.6"))
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert torch.equal(back(x).x_hat, sae(x).x_hat) and torch.equal(sparse(x).x_hat, sae(x).x_hat)
