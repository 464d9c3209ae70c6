"""Export and import in EleutherAI sparsify's format: `cfg.json` + `sae.safetensors` (anchors §4).

sparsify's SparseCoder stores `encoder.weight` [d_sae, d_in] (= W_encᵀ), `encoder.bias`, `W_dec`
[d_sae, d_in] and `b_dec`, always subtracts b_dec before encoding, and selects with ReLU-then-TopK.
Only TopK SAEs with `apply_b_dec_to_input=True` have an exact sparsify equivalent.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from saelab.files import atomic_dir
from saelab.sae import SAE, TopK


def save_sparsify(sae: SAE, path: str | Path) -> Path:
    if not isinstance(sae.activation, TopK) or not sae.apply_b_dec_to_input:
        raise TypeError("the sparsify format holds TopK SAEs that subtract b_dec from the input (sae=topk).")
    sd = {
        "encoder.weight": sae.W_enc.detach().t().contiguous().clone(),
        "encoder.bias": sae.b_enc.detach().clone(),
        "W_dec": sae.W_dec.detach().contiguous().clone(),
        "b_dec": sae.b_dec.detach().clone(),
    }
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, sae.d_sae // sae.d_in),
        "normalize_decoder": bool(sae.normalize_decoder),
        "num_latents": sae.d_sae,
        "k": sae.activation.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.d_in,
    }
    with atomic_dir(path) as tmp:
        save_file(sd, str(tmp / "sae.safetensors"))
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return Path(path)


def load_sparsify(path: str | Path) -> SAE:
    path = Path(path)
    if not (path / "cfg.json").exists() or not (path / "sae.safetensors").exists():
        raise FileNotFoundError(f"{path} is not a sparsify SAE directory (cfg.json + sae.safetensors).")
    cfg = json.loads((path / "cfg.json").read_text())
    if cfg.get("activation", "topk") != "topk" or cfg.get("skip_connection") or cfg.get("transcode"):
        raise ValueError(
            f"{path}: saelab reads plain TopK sparsify SAEs (no skip connection, not a transcoder)."
        )
    sd = load_file(str(path / "sae.safetensors"))
    d_sae, d_in = sd["encoder.weight"].shape
    sae = SAE(d_in, d_sae, TopK(int(cfg["k"])), normalize_decoder=bool(cfg.get("normalize_decoder", True)))
    dtype = sd["encoder.weight"].dtype
    sae.to(dtype)
    sae.W_enc.data.copy_(sd["encoder.weight"].t())
    sae.b_enc.data.copy_(sd["encoder.bias"])
    sae.W_dec.data.copy_(sd["W_dec"])
    sae.b_dec.data.copy_(sd["b_dec"])
    sae.b_dec_initialized.fill_(True)
    return sae.eval()
