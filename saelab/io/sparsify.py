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
multiplies it back in. `cfg.json` also records the sha256 of `sae.safetensors` (`WEIGHTS_SHA256_KEY`), which
`load_sparsify` checks, with the fields it uses (k ≤ the number of latents, widths matching the tensors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saelab.files import CorruptFile, atomic_dir, load_safetensors, save_safetensors
from saelab.sae import SAE, TopK
from saelab.sae.model import (
    FOLDED_SCALE_KEY,
    WEIGHTS_SHA256_KEY,
    fix_export,
    read_cfg,
    rescale_inputs,
    scale_of,
)

TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


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
        cfg[WEIGHTS_SHA256_KEY] = save_safetensors(tensors, tmp / "sae.safetensors")
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def _check(cfg: dict[str, Any], t: dict, cfg_file: Path, w_file: Path) -> tuple[int, int, int]:
    """(d_in, d_sae, k) of a sparsify folder, after checking the fields `load_sparsify` uses against the
    tensors; a bad one raises one line naming the file and the field."""
    missing = [n for n in TENSORS if n not in t]
    if missing:
        raise CorruptFile(f"{w_file} lacks {', '.join(missing)}. {fix_export(w_file.parent)}")
    if t["encoder.weight"].ndim != 2:
        raise CorruptFile(
            f"{w_file}: encoder.weight has shape {tuple(t['encoder.weight'].shape)}, not [d_sae, d_in]. "
            f"{fix_export(w_file.parent)}"
        )
    d_sae, d_in = t["encoder.weight"].shape
    want = {
        "encoder.weight": (d_sae, d_in),
        "encoder.bias": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
    }
    for name, shape in want.items():
        if tuple(t[name].shape) != shape:
            raise CorruptFile(
                f"{w_file}: {name} has shape {tuple(t[name].shape)}, encoder.weight makes it {shape}. "
                f"{fix_export(w_file.parent)}"
            )
    for name, value in (("d_in", d_in), ("num_latents", d_sae)):
        got = cfg.get(name)
        if got not in (None, 0, value) or isinstance(got, bool):  # sparsify's num_latents=0: d_in × expansion
            raise CorruptFile(
                f"{cfg_file}: {name}={got!r} but the weights have {value}. {fix_export(cfg_file.parent)}"
            )
    k = cfg.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= d_sae:
        raise CorruptFile(
            f"{cfg_file}: k={k!r} is not a positive integer up to the {d_sae} latents. {fix_export(cfg_file.parent)}"
        )
    return d_in, d_sae, k


def load_sparsify(path: str | Path, trainable: bool = False) -> SAE:
    """Read one hookpoint's sparsify folder into a saelab `SAE`, as trained (a folded input scale is multiplied
    back in), for inference (eval mode, no parameter gradients) unless `trainable`. A recorded sha256 of the
    weights and the fields of `cfg.json` are checked first (`CorruptFile` names the file and the field)."""
    path = Path(path)
    cfg_file, w_file = path / "cfg.json", path / "sae.safetensors"
    if not cfg_file.exists() or not w_file.exists():
        raise FileNotFoundError(
            f"{path} is not a sparsify SAE directory (cfg.json + sae.safetensors); sparsify keeps one per "
            "hookpoint, e.g. <run>/layers.6."
        )
    cfg = read_cfg(cfg_file)
    if cfg.get("activation", "topk") != "topk" or cfg.get("skip_connection") or cfg.get("transcode"):
        raise ValueError(
            f"{path}: saelab reads plain TopK sparsify SAEs (no skip connection, not a transcoder)."
        )
    t = load_safetensors(w_file, fix_export(path), sha256=cfg.get(WEIGHTS_SHA256_KEY))
    d_in, d_sae, k = _check(cfg, t, cfg_file, w_file)
    sd = {
        "W_enc": t["encoder.weight"].t(),
        "b_enc": t["encoder.bias"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    }
    scale = scale_of(cfg, cfg_file)
    sd = rescale_inputs(sd, scale)
    sae = SAE(d_in, d_sae, TopK(k), normalize_decoder=bool(cfg.get("normalize_decoder", True)))
    sae.to(sd["W_enc"].dtype)
    sae.set_weights(sd, w_file)
    setattr(sae, "act_scale", scale)  # noqa: B010  (as in load_sae: a plain attribute, not state)
    return sae.train(trainable).requires_grad_(trainable)
