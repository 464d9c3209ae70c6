"""Export and import in EleutherAI sparsify's format: `cfg.json` + `sae.safetensors` (anchors §4).

sparsify's SparseCoder stores `encoder.weight` [d_sae, d_in] (= W_encᵀ), `encoder.bias`, `W_dec`
[d_sae, d_in] and `b_dec`, always subtracts b_dec before encoding, and selects with ReLU-then-TopK.
Only TopK SAEs with `apply_b_dec_to_input=True` have an exact sparsify equivalent.

sparsify keeps one SAE per hookpoint in a folder named after it, under the run's folder
(`<run>/layers.6/`), and `SparseCoder.load_many(<run>, local=True)` returns {hookpoint: SAE} from those
folder names; `save_sparsify` writes that layout. The hookpoint is the module path under the HF model's
`base_model` ("layers.6" for Llama's "model.layers.6"; a causal-LM host's `sparsify_hookpoint`).
As in the SAELens export, an input scale s the SAE was trained at (s·h) is folded into the weights so
the export reads h; `cfg.json` records it (sparsify ignores keys it does not know) and `load_sparsify`
multiplies it back in.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from saelab.files import atomic_dir
from saelab.sae import SAE, TopK
from saelab.sae.model import FOLDED_SCALE_KEY, rescale_inputs


def save_sparsify(sae: SAE, root: str | Path, hookpoint: str, act_scale: float | None = None) -> Path:
    """Write `sae` to `root/<hookpoint>/` in sparsify's format (atomically) and return that folder.

    Args:
        sae: a TopK SAE that subtracts b_dec from its input.
        root: the run folder that `SparseCoder.load_many(root, local=True)` reads; other hookpoints'
            SAEs in it are kept.
        hookpoint: the module path under the model's `base_model`, e.g. "layers.6".
        act_scale: the scale s of the inputs the SAE was trained on (s·h), folded into the weights.
            Default: the scale a loader recorded on the SAE (`act_scale`), else 1.
    """
    if not isinstance(sae.activation, TopK) or not sae.apply_b_dec_to_input:
        raise TypeError("the sparsify format holds TopK SAEs that subtract b_dec from the input (sae=topk).")
    if not hookpoint or Path(hookpoint).is_absolute() or ".." in Path(hookpoint).parts:
        raise ValueError(f"a sparsify hookpoint is a module path such as 'layers.6', got {hookpoint!r}.")
    if act_scale is None:
        act_scale = float(getattr(sae, "act_scale", None) or 1.0)
    sd = {n: getattr(sae, n).detach().contiguous().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    sd = rescale_inputs(sd, 1.0 / act_scale)
    tensors = {
        "encoder.weight": sd["W_enc"].t().contiguous(),
        "encoder.bias": sd["b_enc"],
        "W_dec": sd["W_dec"],
        "b_dec": sd["b_dec"],
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
        FOLDED_SCALE_KEY: float(act_scale),
    }
    out = Path(root) / hookpoint
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "sae.safetensors"))
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def load_sparsify(path: str | Path, trainable: bool = False) -> SAE:
    """Read one hookpoint's sparsify folder into a saelab `SAE`, as trained (a folded input scale is multiplied
    back in), for inference (eval mode, no parameter gradients) unless `trainable`."""
    path = Path(path)
    if not (path / "cfg.json").exists() or not (path / "sae.safetensors").exists():
        raise FileNotFoundError(
            f"{path} is not a sparsify SAE directory (cfg.json + sae.safetensors); sparsify keeps one per "
            "hookpoint, e.g. <run>/layers.6."
        )
    cfg = json.loads((path / "cfg.json").read_text())
    if cfg.get("activation", "topk") != "topk" or cfg.get("skip_connection") or cfg.get("transcode"):
        raise ValueError(
            f"{path}: saelab reads plain TopK sparsify SAEs (no skip connection, not a transcoder)."
        )
    t = load_file(str(path / "sae.safetensors"))
    sd = {
        "W_enc": t["encoder.weight"].t(),
        "b_enc": t["encoder.bias"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    }
    scale = float(cfg.get(FOLDED_SCALE_KEY) or 1.0)
    sd = rescale_inputs(sd, scale)
    d_in, d_sae = sd["W_enc"].shape
    sae = SAE(d_in, d_sae, TopK(int(cfg["k"])), normalize_decoder=bool(cfg.get("normalize_decoder", True)))
    sae.to(sd["W_enc"].dtype)
    for name, value in sd.items():
        getattr(sae, name).data.copy_(value)
    sae.b_dec_initialized.fill_(True)
    setattr(sae, "act_scale", scale)  # noqa: B010  (as in load_sae: a plain attribute, not state)
    return sae.train(trainable).requires_grad_(trainable)
